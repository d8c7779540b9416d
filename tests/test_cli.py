"""The command line: help and config errors answer without importing the heavy stack; exit codes are the contract."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_medtee

HEAVY = ("torch", "lightning", "transformers", "peft", "mlflow", "pyarrow", "bitsandbytes")


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    return set(filter(None, out.stdout.strip().splitlines()[-1].split(","))) if out.stdout.strip() else set()


def test_help_imports_nothing_heavy():
    loaded = _modules_after("from medtee.cli import build_parser\nbuild_parser().format_help()")
    assert not loaded, f"`medtee --help` imports {sorted(loaded)}"


def test_config_error_imports_nothing_heavy_and_exits_2():
    code = ("from medtee.cli import main\nimport contextlib, io\n"
            "with contextlib.redirect_stderr(io.StringIO()):\n    rc = main(['train', 'qlora.rnak=8'])\n"
            "assert rc == 2, rc")
    loaded = _modules_after(code)
    assert not loaded, f"a config error imports {sorted(loaded)}"


def test_typo_exit_code_and_message(tmp_path):
    res = run_medtee("train", "recipe=demo", "qlora.rnak=8", cwd=tmp_path)
    assert res.returncode == 2
    assert "rnak" in res.stderr and "rank" in res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_lists_the_commands(tmp_path):
    res = run_medtee("--help", cwd=tmp_path)
    assert res.returncode == 0
    for command in ("train", "seal", "recipes", "attest", "data", "keys", "broker", "adapter"):
        assert command in res.stdout


def test_recipes_help_points_digest_at_its_own_help(tmp_path):
    """`medtee recipes --help` showed `digest [name]`; digest takes recipe=NAME and overrides, --mode, --json."""
    res = run_medtee("recipes", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "medtee recipes digest --help" in " ".join(res.stdout.split())


def test_recipes_list_show_validate(tmp_path):
    listed = run_medtee("recipes", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "demo" in listed.stdout.split()
    shown = run_medtee("recipes", "show", "demo", cwd=tmp_path)
    assert shown.returncode == 0 and "@package _global_" in shown.stdout
    valid = run_medtee("recipes", "validate", cwd=tmp_path)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert "ok      medgemma27b_h200_sev_snp" in valid.stdout
    missing = run_medtee("recipes", "show", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "demo" in missing.stderr


def test_cfg_job_prints_the_resolved_recipe_without_running(tmp_path):
    res = run_medtee("train", "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "qlora:" in res.stdout and "quantization: nf4" in res.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_recipes_digest_prints_what_a_run_binds_per_mode(capsys):
    import json

    from medtee import config
    from medtee.cli import main

    assert main(["recipes", "digest", "qlora.rank=8"]) == 0
    train = capsys.readouterr().out.strip()
    assert train == config.recipe_digest(config.compose(["qlora.rank=8"]), mode="train")
    assert main(["recipes", "digest", "qlora.rank=8", "sweep=demo_lr_rank", "--mode", "sweep", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["covers"]["mode"] == "sweep" and doc["digest"] != train and "path" not in doc["covers"]["data"]
    assert main(["recipes", "digest", "--mode", "exfiltrate"]) == 2
    assert "--mode takes one of train, eval, sweep, generate" in capsys.readouterr().err
    assert main(["recipes", "digest", "--mode", "eval"]) == 2  # what the run would refuse, before any hashing
    assert "evaluation.adapter" in capsys.readouterr().err
    assert main(["recipes", "digest", "output.recipient=/no/such/owner.pub"]) == 2  # it used to hash the path text
    assert "output.recipient=/no/such/owner.pub does not exist: the digest covers that file's content" in \
        capsys.readouterr().err
    # data.path is not in the digest: the owner computes it without the sealed directory at hand
    assert main(["recipes", "digest", "data=sealed"]) == 0
    assert capsys.readouterr().out.strip() == config.recipe_digest(
        config.compose(["data=sealed", "data.path=/anywhere"]), mode="train")


def test_recipes_validate_names_a_digest_command_that_runs(capsys):
    from medtee.cli import main

    assert main(["recipes", "validate", "medgemma27b_h200_sev_snp"]) == 0
    assert ("`medtee recipes digest recipe=medgemma27b_h200_sev_snp model.revision=COMMIT "
            "output.recipient=PATH/NAME.pub` (it hashes the weights)") in capsys.readouterr().out
    assert main(["recipes", "validate", "nosuch"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("medtee: no recipe named 'nosuch'. Valid recipes: demo,")


def test_a_weight_file_that_is_a_fifo_is_one_line_not_a_traceback(tmp_path, capsys):
    """sha256_file opens regular files only: a FIFO named like a weight file no longer hangs the digest, and is
    named in one line by `medtee recipes digest` and before a run's key release."""
    import os

    import pytest

    from medtee import config, run
    from medtee.cli import main

    os.mkfifo(tmp_path / "model.safetensors")
    weights = ["model.source=pretrained", f"model.id={tmp_path}"]
    assert main(["recipes", "digest", *weights]) == 2
    assert "a weight file is not a regular file" in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="a weight file is not a regular file"):
        run.train(config.compose(weights), recipe="fifo", out_dir=tmp_path / "out")
