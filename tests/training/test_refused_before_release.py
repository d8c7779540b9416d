"""Bad input found before the data key is released (exit 2, nothing written, no key released), checkpoints at every
requested step, and MLflow runs that are never left RUNNING nor touched by another run's refusal."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import run_medtee
from medtee import cli

from .conftest import COMMON, data_args, mlflow_state, save_tiny_pretrained, summaries

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


def test_a_broker_store_that_cannot_be_opened_is_refused(tmp_path):
    store = tmp_path / ".medtee" / "broker"
    store.mkdir(parents=True)
    (store / "store.lock").symlink_to(tmp_path / "elsewhere")
    res = run_medtee("train", cwd=tmp_path)
    assert res.returncode == 1 and "cannot open the broker store" in res.stderr, res.stderr[-2000:]
    assert RELEASED not in res.stderr and "Traceback" not in res.stderr


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


@pytest.mark.parametrize("sizes", [["hardware.devices=2"], ["hardware.num_nodes=2"]])
def test_several_devices_started_without_torchrun_or_srun_are_refused_before_the_key_is_released(sizes, tmp_path):
    """Lightning used to start the other ranks itself after the key release, with arguments medtee refuses: the run
    was then killed (no teardown, no close, no receipt, its MLflow run left RUNNING)."""
    res = run_medtee("train", "trainer.strategy=ddp", *sizes, "hardware.cpu_threads=1", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "needs 2 processes, one per device, started by torchrun or srun" in res.stderr
    assert "torchrun" in res.stderr and "--nproc_per_node" in res.stderr and "srun" in res.stderr
    assert RELEASED not in res.stderr and "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("launched, world, refused", [
    ({"TORCHELASTIC_RUN_ID": "r", "WORLD_SIZE": "2"}, (2, 1), None),
    ({"TORCHELASTIC_RUN_ID": "r", "WORLD_SIZE": "4"}, (2, 1), "torchrun started 4 processes"),
    ({"TORCHELASTIC_RUN_ID": "r", "WORLD_SIZE": "2"}, (1, 1), "torchrun started 2 processes"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "medtee"}, (2, 2), None),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "medtee"}, (2, 2), "srun started 2 processes"),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "interactive"}, (2, 1), "started alone"),  # Lightning ignores it too
    ({}, (1, 1), None),
])
def test_the_launcher_must_have_started_as_many_processes_as_the_profile_names(launched, world, refused, monkeypatch):
    from medtee import hardware
    from medtee.hardware import HardwareConfig

    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    problem = hardware.launcher_problem(HardwareConfig(devices=world[0], num_nodes=world[1]))
    assert problem is None if refused is None else refused in problem


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained") / "model")


@pytest.mark.parametrize("damage, named", [
    ("tokenizer", "no tokenizer found"), ("config", "its config.json does not describe a model"),
    ("weights", "model.safetensors is not a safetensors file"),
])
def test_a_pretrained_folder_the_run_cannot_load_is_refused_before_the_key_is_released(pretrained, damage, named,
                                                                                          tmp_path):
    """Its tokenizer and config used to be read only after the key release, failing with the message withheld."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(pretrained, folder)
    if damage == "tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "config":
        (folder / "config.json").write_text('{"model_type": "no-such-model"}')
    else:
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:4096])
    cwd = tmp_path / "run"
    cwd.mkdir()
    res = run_medtee("train", "model.source=pretrained", f"model.id={folder}", "trainer.max_steps=1", cwd=cwd)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"model.id={folder}: " in res.stderr and named in res.stderr
    assert RELEASED not in res.stderr and "Traceback" not in res.stderr and list(cwd.iterdir()) == []


def test_a_pretrained_folder_trains_and_its_files_enter_the_digest(pretrained, tmp_path):
    args = ["model.source=pretrained", f"model.id={pretrained}", "trainer.max_steps=1", "trainer.val_check_interval=1",
            "trainer.limit_val_batches=1", "data.n_synthetic=40", "tracking.min_aggregate=1"]
    res = run_medtee("train", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = summaries(tmp_path)
    digest = run_medtee("recipes", "digest", "--json", *args, cwd=tmp_path)
    printed = json.loads(digest.stdout)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(printed["covers"]["model"]["weights_sha256"])
    assert summary["recipe_digest"] == printed["digest"]  # the run attested the digest the owner approves
