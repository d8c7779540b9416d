"""Through the CLI, in new processes: exact resume from an encrypted checkpoint (same loss, same adapter, same MLflow
run), evaluating a checkpoint (trainer.validate_only), and a 2-process DDP run on CPU launched by torchrun."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_medtee

pytestmark = pytest.mark.slow

COMMON = ["data=sealed", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
          "trainer.enable_progress_bar=false", "tracking.min_aggregate=1", "data.max_length=96"]


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> Path:
    """A data owner's directory with 40 synthetic dialogues sealed under the simulated policy (broker beside it)."""
    owner = tmp_path_factory.mktemp("owner")
    assert run_medtee("synth", "--n", "40", "--seed", "5", "--out", "d.jsonl", cwd=owner).returncode == 0
    res = run_medtee("seal", "d.jsonl", "--out", "sealed", "--policy", "simulated", cwd=owner)
    assert res.returncode == 0, res.stderr
    return owner


def _data(owner: Path) -> list[str]:
    return [f"data.path={owner / 'sealed'}", f"encryption.broker_dir={owner / '.medtee/broker'}"]


def _summaries(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"dir": str(p.parent)} for p in sorted(cwd.glob("outputs/*/*/summary.json"))]


def _adapter(out_dir: str, cwd: Path) -> dict:
    from safetensors.torch import load_file

    from medtee.training.output import open_adapter

    opened = open_adapter(Path(out_dir) / "adapter.safetensors.enc", cwd / ".medtee/keys/dev-recipient.key",
                          cwd / "opened" / Path(out_dir).name)
    return load_file(opened / "adapter_model.safetensors")


def _mlflow(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        runs = dict(con.execute("select run_uuid, status from runs"))
        steps = {r: sorted(s for (s,) in con.execute(
            "select step from metrics where run_uuid=? and key='train/loss'", (r,))) for r in runs}
        return {"status": runs, "loss_steps": steps}
    finally:
        con.close()


def test_resume_in_a_new_process_is_exact_and_continues_the_mlflow_run(owner, tmp_path):
    run = [*COMMON, *_data(owner), "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
           "trainer.checkpoint_keep=-1"]
    first = run_medtee("train", *run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [whole] = _summaries(tmp_path)
    checkpoints = sorted(Path(whole["dir"]).glob("checkpoints/*.ckpt.enc"))
    assert [p.name for p in checkpoints] == ["step-0000003.ckpt.enc", "step-0000006.ckpt.enc"]

    second = run_medtee("train", *run, f"trainer.resume_from={checkpoints[0]}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(continued)" in second.stderr
    resumed = next(s for s in _summaries(tmp_path) if s["resumed"])
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["final_metrics"]["train/loss"] == whole["final_metrics"]["train/loss"]
    assert resumed["mlflow_run_id"] == whole["mlflow_run_id"]
    a, b = _adapter(whole["dir"], tmp_path), _adapter(resumed["dir"], tmp_path)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(a[k].abs().sum()) > 0 for k in a if "lora_B" in k)  # trained, not the zero init

    tracked = _mlflow(tmp_path / "mlflow.db")
    assert tracked["status"] == {whole["mlflow_run_id"]: "FINISHED"}
    assert tracked["loss_steps"][whole["mlflow_run_id"]][-1] >= 5  # the resumed steps landed in the same run

    evaluate = run_medtee("train", *run, "trainer.validate_only=true", f"trainer.resume_from={checkpoints[1]}",
                          cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    [evaluation] = [s for s in _summaries(tmp_path) if s["mode"] == "validate"]
    assert not list(Path(evaluation["dir"]).glob("adapter*"))
    assert evaluation["mlflow_run_id"] != whole["mlflow_run_id"]
    assert set(evaluation["final_metrics"]) == {"val/loss", "val/perplexity"}
    # the same adapter on the same held-out batch as the trained run's last validation (step 6)
    assert evaluation["final_metrics"]["val/loss"] == pytest.approx(whole["final_metrics"]["val/loss"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_with_torchrun(owner, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "medtee", "train", *COMMON, *_data(owner),
           "trainer.max_steps=3", "trainer.strategy=ddp", "hardware.devices=2", "hardware.cpu_threads=1"]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("data key released") == 2  # each process attested and obtained the key itself
    [summary] = _summaries(tmp_path)  # rank 0 alone writes outputs
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (Path(summary["dir"]) / "adapter.safetensors.enc").exists()
    assert _mlflow(tmp_path / "mlflow.db")["status"] == {summary["mlflow_run_id"]: "FINISHED"}
