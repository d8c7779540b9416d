"""Bad input found before the data key is released (exit 2, nothing written, no key released), checkpoints at every
requested step, and MLflow runs that are never left RUNNING nor touched by another run's refusal."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from conftest import run_medtee
from medtee import cli

from .conftest import COMMON, data_args, mlflow_state, summaries

pytestmark = pytest.mark.slow

RELEASED = "data key released"


def _ed25519_public_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("recipient", ["missing", "ed25519", "private", "directory", "fifo", "device"])
def test_an_unusable_recipient_is_refused_before_the_key_is_released(recipient, tmp_path):
    """A FIFO used to hang the run, and /dev/zero to be read without end."""
    keys = tmp_path / "keys"
    assert run_medtee("keys", "new", "--out", str(keys), "--name", "owner", cwd=tmp_path).returncode == 0
    if recipient == "fifo":
        os.mkfifo(tmp_path / "fifo.pub")
    spec = {"missing": tmp_path / "nope.pub", "ed25519": _ed25519_public_key(tmp_path / "ed.pub"),
            "private": keys / "owner.key", "directory": keys, "fifo": tmp_path / "fifo.pub",
            "device": Path("/dev/zero")}[recipient]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_medtee("train", f"output.recipient={spec}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "output.recipient" in res.stderr and RELEASED not in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_settings_that_cannot_run_are_refused_before_the_key_is_released(tmp_path):
    res = run_medtee("train", "hardware.devices=0", "trainer.lr=-1", cwd=tmp_path)
    assert res.returncode == 2 and "hardware.devices" in res.stderr and "trainer.lr" in res.stderr
    assert RELEASED not in res.stderr and list(tmp_path.iterdir()) == []


def test_a_broker_ca_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO as the CA bundle used to hang the TLS setup."""
    os.mkfifo(tmp_path / "ca.pem")
    res = run_medtee("train", f"broker.ca={tmp_path / 'ca.pem'}", cwd=tmp_path)
    assert res.returncode == 2 and "broker.ca" in res.stderr and RELEASED not in res.stderr


def _checkpoints_written(cwd: Path, keep: int) -> list[str]:
    """13 dialogues, 1 held out, batches of 4: 3 steps an epoch; 5 steps with a checkpoint at every step."""
    res = run_medtee("train", "data.n_synthetic=13", "data.val_fraction=0.05", "trainer.max_steps=5",
                     "trainer.checkpoint_every_n_steps=1", f"trainer.checkpoint_keep={keep}",
                     "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "tracking.min_aggregate=1",
                     "trainer.enable_progress_bar=false", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = summaries(cwd)
    return sorted(p.name for p in Path(summary["dir"]).glob("checkpoints/*.ckpt.enc"))


def test_a_checkpoint_at_every_step_across_an_epoch_boundary(tmp_path):
    """Step 3 ends the first epoch: its checkpoint is written too."""
    assert _checkpoints_written(tmp_path, keep=-1) == [f"step-{s:07d}.ckpt.enc" for s in range(1, 6)]


def test_checkpoint_keep_prunes_to_the_most_recent(tmp_path):
    assert _checkpoints_written(tmp_path, keep=2) == ["step-0000004.ckpt.enc", "step-0000005.ckpt.enc"]


def test_resuming_with_another_lora_rank_is_refused_and_leaves_the_earlier_run_alone(owner, tmp_path):
    run = [*COMMON, *data_args(owner), "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"]
    first = run_medtee("train", *run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [summary] = summaries(tmp_path)
    [checkpoint] = Path(summary["dir"]).glob("checkpoints/*.ckpt.enc")
    before = mlflow_state(tmp_path / "mlflow.db")

    res = run_medtee("train", *run, "qlora.rank=8", f"trainer.resume_from={checkpoint}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "another shape" in res.stderr and "qlora" in res.stderr and "Traceback" not in res.stderr
    assert mlflow_state(tmp_path / "mlflow.db") == before  # the earlier run is still FINISHED; no new run
    assert before["status"] == {summary["mlflow_run_id"]: "FINISHED"}
    assert len(summaries(tmp_path)) == 1


def test_a_run_that_fails_leaves_its_mlflow_run_failed(tmp_path, monkeypatch, capsys):
    """Any failure after the MLflow run opened (here: building the Trainer) closes it FAILED, not RUNNING."""
    from medtee.training import engine

    def broken(*args, **kwargs):
        raise RuntimeError("boom: a message that must not be printed")

    monkeypatch.setattr(engine, "build_trainer", broken)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]) == 3
    err = capsys.readouterr().err
    assert "RuntimeError" in err and "boom" not in err
    con = sqlite3.connect(tmp_path / "mlflow.db")
    try:
        assert [s for (s,) in con.execute("select status from runs")] == ["FAILED"]
    finally:
        con.close()


def test_a_key_broker_that_is_down_is_a_refusal(tmp_path):
    """Documented as exit 1 (refused), never a failed run (exit 3)."""
    res = run_medtee("train", "broker.url=http://127.0.0.1:9", "trainer.max_steps=2", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "unreachable" in res.stderr and RELEASED not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("recipe", ["demo_gpu", "medgemma27b_random_gpu_dev"])
def test_a_gpu_development_recipe_on_a_machine_without_cuda_is_refused_before_anything(recipe, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the recipe would run (see tests/training/test_gpu_dev_cuda.py)")
    res = run_medtee("train", f"recipe={recipe}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "hardware profile 'gpu_dev' needs CUDA GPUs" in res.stderr and "hardware=cpu_dev" in res.stderr
    assert RELEASED not in res.stderr and "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


def test_random_weights_the_device_cannot_hold_are_refused_before_the_key_is_released(monkeypatch):
    """Drawing all 62 layers of gemma3_27b on a 2-core CI machine used to end in an out-of-memory kill after the key
    was released (no teardown, no close)."""
    from medtee import config, hardware, run

    cfg = config.compose(["recipe=demo", "model=medgemma_27b", "model.source=random", "model.compile_layers=false"])
    import collections
    import shutil

    monkeypatch.setattr(hardware, "free_host_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("U", "total used free")(0, 0, 2**40))
    with pytest.raises(run.Refused, match=r"draws 27\.0e9 parameters in bfloat16 \(50\.3 GiB\) and copies them once "
                                          r"to load them quantized: the host needs 100\.6 GiB and has 64\.0 GiB free"
                                          r".*cut the depth with model.num_layers=N \(each gemma3_27b layer is 0\.77"):
        run.preflight(cfg)
    four = config.compose(["recipe=demo", "model=medgemma_27b", "model.source=random", "model.num_layers=4"])
    run.preflight(four)  # 5.7 GiB, twice over: fits
    monkeypatch.setattr(hardware, "free_host_memory", lambda: 8 * 2**30)
    with pytest.raises(run.Refused, match=r"the host needs 11\.4 GiB and has 8\.0 GiB free"):
        run.preflight(four)
