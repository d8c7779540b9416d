"""Hostile recipes, overrides and flags: nothing a user supplies makes medtee import or call code, read the
environment, or change Hydra's behaviour. Each is refused with exit 2, naming the key, with nothing run or written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_medtee
from medtee import cli, config

PWNED = "PWNED_DIR"


def _recipe(tmp_path: Path, body: str, name: str = "hostile") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text("# @package _global_\n" + textwrap.dedent(body).replace("{PWNED}", str(tmp_path / PWNED)))
    return str(path)


def _refused(tmp_path, monkeypatch, capsys, *argv: str) -> str:
    """Run `medtee train ARGV` in-process in tmp_path; it must exit 2 having written nothing but the recipe files."""
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused recipe wrote something"
    assert "Traceback" not in err and err.startswith("medtee: configuration error: ")
    return err


# ----------------------------------------------------------------------------------------- Hydra's own settings

HYDRA_SECTIONS = {
    "callbacks": """
        hydra:
          callbacks:
            a:
              _target_: os.makedirs
              _args_: ["{PWNED}"]
        """,
    "launcher": """
        hydra:
          launcher:
            _target_: os.makedirs
            name: "{PWNED}"
        """,
    "sweeper": """
        hydra:
          sweeper:
            _target_: os.makedirs
            name: "{PWNED}"
        """,
    "searchpath": """
        hydra:
          searchpath: [file:///tmp]
        """,
    "env_set": """
        hydra:
          job:
            env_set:
              LD_PRELOAD: /tmp/evil.so
        """,
    "run_dir": """
        hydra:
          run:
            dir: /tmp/elsewhere
        """,
}


@pytest.mark.parametrize("section", sorted(HYDRA_SECTIONS))
def test_a_recipe_cannot_set_hydra(section, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={_recipe(tmp_path, HYDRA_SECTIONS[section])}",
                   "trainer.max_steps=2")
    assert "key 'hydra'" in err


@pytest.mark.parametrize("entry", ["override /hydra/launcher: basic", "override /hydra/sweeper: basic",
                                   "override /hydra/callbacks: evil", "override /hydra/job_logging: default",
                                   "/hydra/launcher: basic", "hydra/launcher: basic"])
def test_a_recipe_defaults_list_cannot_reach_hydra_groups(entry, tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, f"defaults:\n  - {entry}\n")
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")
    assert "defaults entry" in err


@pytest.mark.parametrize("override", [
    "hydra.callbacks.a._target_=os.makedirs", "+hydra.callbacks.a._target_=os.makedirs",
    "++hydra.callbacks.a._target_=os.makedirs", "hydra/launcher=basic", "hydra/sweeper=basic",
    "hydra.searchpath=[file:///tmp]", "+hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "~hydra.run",
    "hydra.run.dir=/tmp/elsewhere", "hydra.job.chdir=true",
])
def test_an_override_cannot_set_hydra(override, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, override)
    assert "hydra" in err


@pytest.mark.parametrize("flags", [
    ["--config-dir", "/tmp"], ["-cd", "/tmp"], ["--config-path", "/tmp"], ["-cp", "/tmp"],
    ["--config-name", "evil"], ["-cn", "evil"], ["--experimental-rerun", "config.pickle"],
    ["--shell-completion"], ["-sc", "install=bash"], ["--info", "all"], ["--cfg", "evil"], ["--run"],
])
def test_flags_that_load_config_or_code_are_refused(flags, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, *flags)
    assert flags[0] in err


# ---------------------------------------------------------------------------------------- instantiation keys

TARGETS = {
    "top level": "_target_: os.makedirs\n",
    "a section": "qlora:\n  _target_: os.makedirs\n  _args_: ['{PWNED}']\n",
    "a nested section": "model:\n  tiny:\n    _target_: os.makedirs\n",
    "a list": "qlora:\n  target_modules:\n    - _target_: os.makedirs\n      _args_: ['{PWNED}']\n",
    "_partial_": "trainer:\n  _partial_: true\n",
    "_recursive_": "trainer:\n  _recursive_: false\n",
    "_convert_": "data:\n  _convert_: all\n",
}


@pytest.mark.parametrize("where", sorted(TARGETS))
def test_instantiation_keys_are_refused_at_every_depth(where, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={_recipe(tmp_path, TARGETS[where])}")
    assert "_" in err and ("instantiation key" in err or "unknown top-level key" in err)


@pytest.mark.parametrize("override", ["qlora._target_=os.makedirs", "+qlora._target_=os.makedirs",
                                      "qlora.target_modules=[{_target_:os.makedirs}]", "+_target_=os.makedirs"])
def test_instantiation_keys_are_refused_in_overrides(override, tmp_path, monkeypatch, capsys):
    _refused(tmp_path, monkeypatch, capsys, override)


# ------------------------------------------------------------------------------------------------- resolvers

RESOLVED = ["${oc.env:HOME}", "x${oc.env:HOME}y", "${oc.env:HOME,fallback}", "${now:%Y}", "${hydra:runtime.cwd}",
            "${hydra.runtime.cwd}", "${oc.decode:'1'}", "${oc.create:{a:1}}", "${oc.select:tracking.experiment}",
            "${medtee_test_evil:}", "${unregistered_resolver:x}", r"\${oc.env:HOME}"]


@pytest.mark.parametrize("value", RESOLVED)
def test_resolver_interpolations_are_refused_in_recipes(value, tmp_path, monkeypatch, capsys, evil_resolver):
    path = _recipe(tmp_path, f"tracking:\n  experiment: {json.dumps(value)}\n")
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")
    assert "tracking.experiment" in err and "resolver" in err
    assert not evil_resolver.exists(), "a resolver ran"


@pytest.mark.parametrize("value", RESOLVED)
def test_resolver_interpolations_are_refused_in_overrides(value, tmp_path, monkeypatch, capsys, evil_resolver):
    err = _refused(tmp_path, monkeypatch, capsys, f'tracking.experiment="{value}"')
    assert "tracking.experiment" in err
    assert not evil_resolver.exists(), "a resolver ran"


@pytest.fixture
def evil_resolver(tmp_path_factory):
    """A custom resolver registered in this process: referring to it must not call it."""
    from omegaconf import OmegaConf

    marker = tmp_path_factory.mktemp("resolver") / "called"
    OmegaConf.register_new_resolver("medtee_test_evil", lambda: marker.write_text("called") and "x", replace=True)
    yield marker
    OmegaConf.clear_resolver("medtee_test_evil")


def test_references_to_other_recipe_values_still_work(tmp_path):
    path = _recipe(tmp_path, "qlora:\n  rank: 8\n  alpha: ${qlora.rank}\n", name="refs")
    [override] = config.use_recipe_files([f"recipe={path}"])
    cfg = config.compose([override])
    assert cfg.qlora.alpha == 8


# --------------------------------------------------------------------------------- files from outside conf/

def test_defaults_cannot_pull_files_from_outside_conf(tmp_path, monkeypatch, capsys):
    outside = tmp_path / "outside.yaml"
    outside.write_text("# @package _global_\nhydra:\n  callbacks:\n    a:\n      _target_: os.makedirs\n")
    relative = Path("..") / ".." / ".." / ".." / ".." / outside.relative_to("/")
    for entry in (f"override /hardware: {relative.with_suffix('')}", f"override /hardware: {outside.with_suffix('')}",
                  "override /schema/hardware: hardware", "override /recipe: demo", "hardware: cpu_dev"):
        path = _recipe(tmp_path, "defaults:\n  - " + entry + "\n")
        err = _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")
        assert "defaults entry" in err


@pytest.mark.parametrize("override", ["hardware=../../../../tmp/outside", "hardware=/tmp/outside",
                                      "schema/hardware=hardware", "+extra_group=x", "~hardware",
                                      "hardware@trainer=cpu_dev", "hardware=cpu_dev,../x"])
def test_group_overrides_name_shipped_options_only(override, tmp_path, monkeypatch, capsys):
    (tmp_path / "outside.yaml").write_text("hydra:\n  callbacks: {}\n")
    Path("/tmp/outside.yaml").write_text("hydra:\n  callbacks: {}\n")
    _refused(tmp_path, monkeypatch, capsys, override)


@pytest.mark.parametrize("body", [
    "qlora: !!python/object/apply:os.makedirs ['{PWNED}']\n",
    "qlora: !!python/name:os.makedirs\n",
    "qlora: !!python/object/new:os.makedirs ['{PWNED}']\n",
])
def test_yaml_tags_that_construct_objects_are_refused(body, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={_recipe(tmp_path, body)}")
    assert "not valid YAML" in err


def test_recipe_file_names_are_plain(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, "qlora:\n  rank: 8\n", name="a.b")
    _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")


def test_unknown_top_level_keys_in_a_recipe_name_the_valid_ones(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, "launcher:\n  x: 1\n")
    err = _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")
    assert "'launcher'" in err and "qlora" in err


def test_the_reported_attack_runs_nothing_and_writes_nothing(tmp_path):
    """The issue's reproduction, as a user runs it: `medtee train recipe=./evil.yaml` with hydra.callbacks."""
    (tmp_path / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    a:\n      _target_: os.makedirs\n"
        "      _args_: [\"PWNED_DIR\"]\n")
    res = run_medtee("train", "recipe=./evil.yaml", "trainer.max_steps=2", cwd=tmp_path, fresh=True)
    assert res.returncode == 2, res.stderr
    assert "key 'hydra'" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]


def test_model_attention_backend_is_a_fixed_choice(tmp_path, monkeypatch, capsys):
    """A hub kernel id as the attention backend would make transformers download and import code."""
    err = _refused(tmp_path, monkeypatch, capsys, "model.attn_implementation=kernels-community/flash-attn")
    assert "model.attn_implementation" in err and "sdpa" in err


@pytest.mark.parametrize("uri", ["databricks://profile", "file:///tmp/mlruns", "postgresql://h/db", "plugin:x"])
def test_tracking_uri_names_a_store_kind_medtee_allows(uri, tmp_path, monkeypatch, capsys):
    """Other MLflow URI schemes select tracking-store plugins by entry point: code the recipe would choose."""
    err = _refused(tmp_path, monkeypatch, capsys, f"tracking.tracking_uri={uri}")
    assert "tracking.tracking_uri" in err


# --------------------------------------------------------------------- found by an attacker's review, now refused

def test_a_resolver_hidden_in_an_overridden_override_reads_nothing(tmp_path):
    """Hydra keeps every override's text and `--resolve` resolves it, even one a later override replaced."""
    res = run_medtee("train", "--cfg", "hydra", "--resolve", "tracking.experiment=${oc.env:MEDTEE_TEST_SECRET}",
                     "tracking.experiment=x", cwd=tmp_path, env={"MEDTEE_TEST_SECRET": "s3cr3t-from-env"}, fresh=True)
    assert res.returncode == 2 and "s3cr3t" not in res.stdout + res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_key_given_twice_is_refused(tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, "qlora.rank=4", "qlora.rank=8")
    assert "given twice" in err


@pytest.mark.parametrize("argv, named", [
    (["-m", "--cfg", "job"], "--cfg prints one recipe"), (["--resolve"], "--resolve"),
    (["--hydra-help", "trainer.max_steps=2"], "--hydra-help"), (["trainer.max_steps=2,3"], "add -m"),
    (["--package", "--config-dir=/tmp"], "--package needs a value"), (["--cfg", "job", "--package", "../x"], "section"),
])
def test_flag_combinations_hydra_would_crash_on_are_refused(argv, named, tmp_path, monkeypatch, capsys):
    assert named in _refused(tmp_path, monkeypatch, capsys, *argv)


def test_a_lone_surrogate_is_refused(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, 'tracking:\n  experiment: "\\ud800"\n')
    assert "not valid Unicode" in _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, monkeypatch, capsys):
    """Nine levels of ten aliases each ("billion laughs") exhausted memory inside the YAML loader."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"{b}: &{b} [{','.join(['*' + a] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    path = _recipe(tmp_path, "\n".join(lines) + "\n")
    assert "anchors and aliases" in _refused(tmp_path, monkeypatch, capsys, f"recipe={path}")


def test_recipe_files_are_small_regular_files(tmp_path, monkeypatch, capsys):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in _refused(tmp_path, monkeypatch, capsys, f"recipe={fifo}")  # no hang
    big = _recipe(tmp_path, "qlora:\n  rank: 8\n" + "# padding\n" * 30_000, name="big")
    assert "at most" in _refused(tmp_path, monkeypatch, capsys, f"recipe={big}")


def test_mlflow_credentials_go_only_to_the_server_the_operator_named(tmp_path):
    """MLflow attaches MLFLOW_TRACKING_TOKEN to whatever server tracking.tracking_uri names."""
    res = run_medtee("train", "tracking.tracking_uri=http://127.0.0.1:9", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_TOKEN": "tee-secret-token", "MLFLOW_TRACKING_URI": "https://ml.example"})
    assert res.returncode == 2 and "MLFLOW_TRACKING_TOKEN" in res.stderr and "tee-secret-token" not in res.stderr
    assert "data key released" not in res.stderr and not (tmp_path / "outputs").exists()


def test_files_a_recipe_names_enter_the_digest_by_content(tmp_path):
    """Two recipes naming the same path but different keys (or CA bundles, or weights) never share a digest."""
    from omegaconf import OmegaConf

    key, ca = tmp_path / "owner.pub", tmp_path / "ca.pem"
    cfg = config.compose(["recipe=demo"])
    OmegaConf.update(cfg, "output.recipient", str(key))
    OmegaConf.update(cfg, "broker.ca", str(ca))
    digests = set()
    for key_bytes, ca_bytes in ((b"key one", b"ca one"), (b"key two", b"ca one"), (b"key two", b"ca two")):
        key.write_bytes(key_bytes), ca.write_bytes(ca_bytes)
        digests.add(config.recipe_digest(cfg))
    digests.add(config.recipe_digest(cfg, weights={"model.safetensors": "ab" * 32}))
    digests.add(config.recipe_digest(cfg, weights={"model.safetensors": "cd" * 32}))
    assert len(digests) == 5


@pytest.mark.parametrize("key", ["hardware.name", "attestation.name", "model.name"])
def test_the_label_of_a_chosen_option_cannot_be_set(key, tmp_path):
    """A development run could otherwise call its profile h200_sev_snp or its policy snp_h200 in tags and receipts."""
    from medtee import config
    from medtee.config import ConfigError

    with pytest.raises(ConfigError, match=f"{key} names the chosen .* option and cannot be set"):
        config.compose(["recipe=demo", "hardware=gpu_dev", f"{key}=h200_sev_snp"])
    group, field = key.split(".")
    recipe = tmp_path / "labelled.yaml"
    recipe.write_text(f"# @package _global_\n{group}:\n  {field}: snp_h200\n")
    with pytest.raises(ConfigError, match=f"{key} names the chosen .* option and cannot be set"):
        config.compose(config.use_recipe_files([f"recipe={recipe}"]))
