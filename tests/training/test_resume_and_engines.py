"""Through the CLI, in new processes: exact resume of a killed run from its encrypted checkpoint (same loss, same
adapter, same MLflow run), evaluating a checkpoint (trainer.validate_only), and 2-process DDP and FSDP runs on CPU
launched by torchrun: FSDP trains exactly as DDP does and resumes exactly from its own checkpoint; two torchrun
"nodes" (one process each), and two tasks in the environment srun gives them, train exactly as torchrun's two
processes on one node."""

from __future__ import annotations

import json
import os
import signal
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


def test_a_killed_run_resumes_exactly_and_continues_its_mlflow_run(owner, tmp_path):
    """Train N steps; train again and SIGKILL it after its N/2 checkpoint; resume that in a new process to N:
    the same final loss and a bit-identical adapter, and the killed run's MLflow run is the one that finishes."""
    run = [*COMMON, *_data(owner), "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
           "trainer.checkpoint_keep=-1"]
    whole_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    first = run_medtee("train", *run, cwd=whole_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    [whole] = _summaries(whole_dir)
    checkpoints = sorted(Path(whole["dir"]).glob("checkpoints/*.ckpt.enc"))
    assert [p.name for p in checkpoints] == ["step-0000003.ckpt.enc", "step-0000006.ckpt.enc"]

    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("killed_after_first_checkpoint.py")),
                             "train", *run], cwd=killed_dir, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not _summaries(killed_dir)  # it never finished
    [checkpoint] = killed_dir.glob("outputs/*/*/checkpoints/*.ckpt.enc")
    assert checkpoint.name == "step-0000003.ckpt.enc"

    second = run_medtee("train", *run, f"trainer.resume_from={checkpoint}", cwd=killed_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(continued)" in second.stderr
    [resumed] = _summaries(killed_dir)
    assert resumed["resumed"] and resumed["steps"] == whole["steps"] == 6
    assert resumed["final_metrics"]["train/loss"] == whole["final_metrics"]["train/loss"]
    a, b = _adapter(whole["dir"], whole_dir), _adapter(resumed["dir"], killed_dir)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(a[k].abs().sum()) > 0 for k in a if "lora_B" in k)  # trained, not the zero init

    tracked = _mlflow(killed_dir / "mlflow.db")
    assert tracked["status"] == {resumed["mlflow_run_id"]: "FINISHED"}  # the killed run's own MLflow run
    assert tracked["loss_steps"][resumed["mlflow_run_id"]][-1] >= 5  # the resumed steps landed in it

    evaluate = run_medtee("train", *run, "trainer.validate_only=true", f"trainer.resume_from={checkpoints[1]}",
                          cwd=whole_dir)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    [evaluation] = [s for s in _summaries(whole_dir) if s["mode"] == "validate"]
    assert not list(Path(evaluation["dir"]).glob("adapter*"))
    assert evaluation["mlflow_run_id"] != whole["mlflow_run_id"]
    assert set(evaluation["final_metrics"]) == {"val/loss", "val/perplexity"}
    # the same adapter on the same held-out batch as the trained run's last validation (step 6)
    assert evaluation["final_metrics"]["val/loss"] == pytest.approx(whole["final_metrics"]["val/loss"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *script, "train", *COMMON, "hardware.devices=2",
           "hardware.cpu_threads=1", *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ddp_run(owner, tmp_path_factory) -> tuple[Path, dict]:
    cwd = tmp_path_factory.mktemp("ddp")
    res = _torchrun(["-m", "medtee"], *_data(owner), "trainer.max_steps=3", "trainer.strategy=ddp", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("data key released") == 2  # each process attested and obtained the key itself
    [summary] = _summaries(cwd)  # rank 0 alone writes outputs
    return cwd, summary


def test_two_process_ddp_on_cpu_with_torchrun(ddp_run):
    cwd, summary = ddp_run
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (Path(summary["dir"]) / "adapter.safetensors.enc").exists()
    assert _mlflow(cwd / "mlflow.db")["status"] == {summary["mlflow_run_id"]: "FINISHED"}


def test_two_nodes_train_as_one_node_with_two_processes(owner, ddp_run, tmp_path):
    """Multi-node through torchrun's launcher: an agent per node, each with its own working directory (as on two
    machines). Rank 0's node writes every output; the other node writes nothing."""
    _, ddp = ddp_run
    port, nodes = str(_free_port()), [tmp_path / "node0", tmp_path / "node1"]
    agents = []
    for rank, cwd in enumerate(nodes):
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "medtee", "train",
               *COMMON, *_data(owner), "trainer.max_steps=3", "trainer.strategy=ddp", "hardware.num_nodes=2",
               "hardware.cpu_threads=1"]
        agents.append(subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [agent.communicate(timeout=300)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    [summary] = _summaries(nodes[0])
    assert summary["world_size"] == 2 and summary["final_metrics"] == ddp["final_metrics"]
    assert not list(nodes[1].iterdir())


def test_two_tasks_started_as_srun_starts_them_train_as_torchrun_does(owner, ddp_run, tmp_path):
    """SLURM: Lightning reads ranks and the rendezvous from the variables srun sets for each task."""
    _, ddp = ddp_run
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "medtee",
             "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "medtee", "train", *COMMON, *_data(owner), "trainer.max_steps=3",
           "trainer.strategy=ddp", "hardware.devices=2", "hardware.cpu_threads=1"]
    tasks = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                   "PYTHONUNBUFFERED": "1"}) for rank in (0, 1)]
    errors = [task.communicate(timeout=300)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "SLURM" in errors[0]  # Lightning took the ranks from SLURM's variables
    [summary] = _summaries(tmp_path)
    assert summary["world_size"] == 2 and summary["final_metrics"] == ddp["final_metrics"]


FSDP_ON_CPU = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(owner, ddp_run, tmp_path):
    """QLoRA (4-bit base) sharded by FSDP over 2 CPU processes: the same losses and adapter as the DDP run, a whole
    adapter gathered from the shards, and a resume from its step-2 checkpoint that ends where the run did."""
    ddp_cwd, ddp = ddp_run
    run = [*_data(owner), "trainer.max_steps=3", "trainer.strategy=fsdp", "trainer.checkpoint_every_n_steps=2",
           "model.gradient_checkpointing=true"]  # recomputed inside each FSDP unit, as on the GPU profiles
    res = _torchrun(FSDP_ON_CPU, *run, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [fsdp] = _summaries(tmp_path)
    assert fsdp["world_size"] == 2 and fsdp["steps"] == 3
    assert fsdp["final_metrics"] == pytest.approx(ddp["final_metrics"], rel=1e-5)
    a, b = _adapter(fsdp["dir"], tmp_path), _adapter(ddp["dir"], ddp_cwd)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)  # whole tensors, not rank 0's shard

    [checkpoint] = Path(fsdp["dir"]).glob("checkpoints/*.ckpt.enc")
    assert checkpoint.name == "step-0000002.ckpt.enc"
    res = _torchrun(FSDP_ON_CPU, *run, f"trainer.resume_from={checkpoint}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [resumed] = [s for s in _summaries(tmp_path) if s["resumed"]]
    assert resumed["steps"] == 3 and resumed["mlflow_run_id"] == fsdp["mlflow_run_id"]
    assert resumed["final_metrics"]["train/loss"] == fsdp["final_metrics"]["train/loss"]
    c = _adapter(resumed["dir"], tmp_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
