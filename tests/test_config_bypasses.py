"""Routes around the compose-time checks that an attacker review found (recipes.md findings 3, 4, 7, 8), each closed:
a multirun's combinations, interpolations that copy an undigested field into a recorded one, a recipe-named RIM
trust anchor under a production policy's name, non-finite DP values, and `recipes show` reading any .yaml."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from medtee import cli, config, recipe_guard
from medtee.schema import ConfigError
from medtee.training.config import DPConfig

# ------------------------------------------------------------------------------------- multirun: every combination

#: Each value alone leaves snp_h200 as shipped (the fixed overrides turn `simulated` into a copy of it); the job
#: attestation=snp_h200 + allow_debug=true is what Hydra's multirun also runs. (recipes.md, finding 3)
SWEPT = ["recipe=medgemma27b_h200_sev_snp", "attestation=simulated,snp_h200", "attestation.allow_debug=false,true",
         "attestation.provider=sev_snp", "attestation.production=true", "attestation.allow_simulated=false",
         "attestation.gpu_provider=nvidia", "attestation.gpu.required=true", "attestation.gpu.require_cc_mode=true",
         "attestation.recipe.modes=[train,eval,sweep]"]


def _runnable(tmp_path) -> list[str]:
    assert cli.main(["keys", "new", "--out", str(tmp_path), "--name", "owner"]) == 0
    return [f"data.path={tmp_path}", "model.offline=true", "model.revision=abc", "broker.url=https://b.example",
            f"output.recipient={tmp_path / 'owner.pub'}"]


def test_sweep_expansion_is_every_combination_hydra_runs():
    jobs = config.expand_sweeps(["attestation=simulated,snp_h200", "attestation.allow_debug=false,true", "x=1"])
    assert sorted(jobs) == sorted([[f"attestation={a}", f"attestation.allow_debug={d}", "x=1"]
                                   for a in ("simulated", "snp_h200") for d in ("False", "True")])


def test_a_multirun_cannot_combine_harmless_values_into_a_changed_production_option(tmp_path, monkeypatch, capsys):
    fixed = _runnable(tmp_path)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = cli.main(["train", "-m", *SWEPT, *fixed])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "attestation=snp_h200 is a production option" in err and "attestation.allow_debug cannot be changed" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == before  # no job started


def test_each_job_is_checked_again_on_the_config_hydra_hands_the_run(tmp_path, monkeypatch, capsys):
    """Whatever the pre-check saw, run.main checks the job's own config (here the pre-check sees one job only)."""
    from medtee import run

    fixed = _runnable(tmp_path)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    first_only = config.expand_sweeps
    monkeypatch.setattr(config, "expand_sweeps", lambda overrides: first_only(overrides)[:1])
    trained: list[tuple[str, bool]] = []

    def train(cfg, *, recipe, out_dir, mode="train"):
        trained.append((cfg.attestation.name, cfg.attestation.allow_debug))
        return 0

    monkeypatch.setattr(run, "train", train)
    monkeypatch.setattr(run, "_contain", lambda cfg: contextlib.nullcontext())
    rc = cli.main(["train", "-m", *SWEPT, *fixed])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert ("snp_h200", True) not in trained and len(trained) == 3, (trained, err)
    assert "attestation.allow_debug cannot be changed" in err and "Traceback" not in err


def test_a_multirun_is_capped_before_its_values_are_listed():
    assert recipe_guard.MAX_MULTIRUN_JOBS == 64  # documented in docs/configuration.md
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"-m would run more than 64 jobs, .*trainer.max_steps more than 64"):
        config.expand_sweeps(["trainer.max_steps=range(1,100000)"])
    with pytest.raises(ConfigError, match=r"more than 64 jobs, .*qlora.rank 8, trainer.max_steps 9.*medtee sweep"):
        config.split_argv(["-m", "qlora.rank=1,2,3,4,5,6,7,8", "trainer.max_steps=range(1,10)"])
    for argv in (["-m", "trainer.max_steps=shuffle(range(1,1000000000000))"],  # Hydra lists a shuffled range whole
                 ["-m", "hardware=shuffle(range(1,1000000000000))"], ["-m", "trainer.lr=range(0,1e12,0.5)"]):
        with pytest.raises(ConfigError, match="more than 64 jobs"):
            config.split_argv(argv)
    assert time.monotonic() - start < 2
    assert len(config.expand_sweeps(["qlora.rank=range(1,9)", "trainer.max_steps=range(1,9)"])) == 64


def test_the_job_cap_is_a_clean_configuration_error(tmp_path):
    from conftest import run_medtee

    res = run_medtee("train", "-m", "trainer.max_steps=range(1,1e8)", cwd=tmp_path)
    assert res.returncode == 2 and "more than 64 jobs" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- interpolations of fields the digest leaves out


def _recipe(tmp_path, body: str) -> str:
    path = tmp_path / "leak.yaml"
    path.write_text("# @package _global_\n" + body)
    return str(path)


@pytest.mark.parametrize("field", config.NOT_IN_DIGEST)
def test_no_recipe_value_may_copy_a_field_the_digest_leaves_out(field, tmp_path):
    """`tracking.run_name: ${data.path}` put the dataset's path into MLflow under the innocent recipe's digest."""
    target = "tracking.experiment" if field == "tracking.run_name" else "tracking.run_name"
    section, key = target.split(".")
    body = f"{section}:\n  {key}: run-${{{field}}}\n"
    with pytest.raises(ConfigError) as err:
        config.use_recipe_files([f"recipe={_recipe(tmp_path, body)}"])
    assert f"key '{target}'" in str(err.value) and f"refers to {field}" in str(err.value)
    assert "write the value itself" in str(err.value)
    with pytest.raises(ConfigError, match=f"key '{target}'.*refers to {field}"):
        config.compose([f"{target}=${{{field}}}"])


@pytest.mark.parametrize("override, named", [
    ("tracking.experiment=${.run_name}", "tracking.run_name"),  # relative: a sibling
    ("tracking.experiment=${..data.path}", "data.path"),  # relative: one level up
    ("model.id=x-${ data.path }", "data.path"),
    ("tracking.run_name=${data}", "data (it holds data.path)"),  # a section's string form holds every field
    ("tracking.experiment=a,${broker.dir}", "broker.dir"),  # a sweep's values
])
def test_every_spelling_of_such_a_reference_is_refused(override, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", "-m", override])
    err = capsys.readouterr().err
    assert rc == 2 and f"refers to {named}" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_references_elsewhere_still_work(tmp_path):
    path = _recipe(tmp_path, "qlora:\n  rank: 8\n  alpha: ${qlora.rank}\ntracking:\n  run_name: r-${.experiment}\n")
    cfg = config.compose(config.use_recipe_files([f"recipe={path}", "data.path=/x", "data=sealed"]))
    assert cfg.qlora.alpha == 8 and cfg.tracking.run_name == f"r-{cfg.tracking.experiment}"


# ------------------------------------------------------------------------------- RIM matching under a production name


@pytest.mark.parametrize("overrides, changed", [
    (["attestation.gpu.require_rim_match=true", "attestation.gpu.rim_store=/tmp/my-own-root"],
     "attestation.gpu.require_rim_match, attestation.gpu.rim_store"),
    (["attestation.gpu.require_rim_match=true", "attestation.gpu.rim_store=/tmp/r", "attestation.gpu.allowed_rim_ids=[x]"],
     "attestation.gpu.allowed_rim_ids, attestation.gpu.require_rim_match, attestation.gpu.rim_store"),
])
def test_a_recipe_cannot_supply_the_rim_trust_anchor_of_a_production_policy(overrides, changed):
    """`<rim_store>/rim_root.pem` is the root RIM matching trusts: a recipe naming the store names its own root."""
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=medgemma27b_h200_sev_snp", *overrides])
    message = str(err.value)
    assert f"{changed} cannot be changed from it" in message, message
    assert "rim" not in message.split("may be set")[0].split("only the local paths")[1]  # not offered either
    cfg = config.compose(["recipe=medgemma27b_h200_sev_snp", "attestation.gpu.ocsp_cache=/var/cache/ocsp"])
    assert cfg.attestation.gpu.ocsp_cache == "/var/cache/ocsp"  # the shipped snp_h200 still takes its OCSP cache


def test_a_recipe_cannot_add_a_tcb_floor_to_a_production_policy(tmp_path):
    """A map field takes new keys from a recipe file: a Milan floor of 0 under snp_h200 was not compared to it."""
    body = ("defaults:\n  - override /hardware: h200_sev_snp\n  - override /attestation: snp_h200\n  - _self_\n"
            "attestation:\n  min_tcb_by_product:\n    Milan: {bootloader: 0, tee: 0, snp: 0, microcode: 0, fmc: 0}\n")
    with pytest.raises(ConfigError) as err:
        config.compose(config.use_recipe_files([f"recipe={_recipe(tmp_path, body)}"]))
    assert "attestation.min_tcb_by_product.Milan.bootloader" in str(err.value)
    assert "attestation=snp_h200 is a production option" in str(err.value)


# --------------------------------------------------------------------------------------------------- DP values


@pytest.mark.parametrize("key", ["max_grad_norm", "target_epsilon"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_dp_values_are_finite_and_positive(key, value):
    """With DP on, an infinite clipping norm (or budget) voids the guarantee; NaN passes every comparison."""
    problems = DPConfig(enabled=True, **{key: float(value)}).problems()
    assert any(p.startswith(f"privacy.dp.{key}=") and "must be a finite positive number" in p for p in problems)
    with pytest.raises(ConfigError, match=rf"privacy\.dp\.{key}=.* must be a finite positive number"):
        config.compose([f"privacy.dp.{key}={value}"])  # refused whether or not DP is on: a recipe stays switchable
    assert DPConfig(enabled=True).problems() == []


@pytest.mark.parametrize("value", ["inf", "nan", "1"])
def test_dp_delta_is_in_the_open_unit_interval(value):
    assert any("privacy.dp.target_delta" in p for p in DPConfig(target_delta=float(value)).problems())


# --------------------------------------------------------------------------------------------- recipes show NAME


@pytest.mark.parametrize("name", ["../conf/config", "../../medtee/../conf/config",
                                  str(Path(__file__).resolve().parents[1] / "conf" / "config")])
def test_recipes_show_names_shipped_recipes_only(name, capsys):
    assert cli.main(["recipes", "show", name]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no recipe named" in err and "demo" in err
    with pytest.raises(ConfigError, match="no recipe named"):
        config.recipe_file(name)
    assert config.recipe_file("demo").name == "demo.yaml"
