"""Through the CLI, in new processes: exact resume of a killed run from its encrypted checkpoint (same loss, same
adapter, same MLflow run), evaluating a checkpoint (trainer.validate_only), and 2-process DDP and FSDP runs on CPU
launched by torchrun: FSDP trains exactly as DDP does and resumes exactly from its own checkpoint; two torchrun
"nodes" (one process each), and two tasks in the environment srun gives them, train exactly as torchrun's two
processes on one node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_medtee, run_python
from medtee import config
from medtee.training.module import lr_lambda

from .conftest import COMMON, adapter_weights, data_args, mlflow_state, summaries

pytestmark = pytest.mark.slow

def test_a_killed_run_resumes_exactly_and_continues_its_mlflow_run(owner, tmp_path):
    """Train N steps; train again and SIGKILL it after its N/2 checkpoint; resume that in a new process to N:
    the same final loss and a bit-identical adapter, and the killed run's MLflow run is the one that finishes."""
    run = [*COMMON, *data_args(owner), "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
           "trainer.checkpoint_keep=-1"]
    whole_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    first = run_medtee("train", *run, cwd=whole_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    [whole] = summaries(whole_dir)
    checkpoints = sorted(Path(whole["dir"]).glob("checkpoints/*.ckpt.enc"))
    assert [p.name for p in checkpoints] == ["step-0000003.ckpt.enc", "step-0000006.ckpt.enc"]

    killed = run_python(Path(__file__).with_name("killed_after_first_checkpoint.py"), "train", *run, cwd=killed_dir,
                        timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not summaries(killed_dir)  # it never finished
    [checkpoint] = killed_dir.glob("outputs/*/*/checkpoints/*.ckpt.enc")
    assert checkpoint.name == "step-0000003.ckpt.enc"

    second = run_medtee("train", *run, f"trainer.resume_from={checkpoint}", cwd=killed_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(continued)" in second.stderr
    [resumed] = summaries(killed_dir)
    assert resumed["resumed"] and resumed["steps"] == whole["steps"] == 6
    assert resumed["final_metrics"]["train/loss"] == whole["final_metrics"]["train/loss"]
    a, b = adapter_weights(whole["dir"], whole_dir), adapter_weights(resumed["dir"], killed_dir)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(a[k].abs().sum()) > 0 for k in a if "lora_B" in k)  # trained, not the zero init

    tracked = mlflow_state(killed_dir / "mlflow.db")
    assert tracked["status"] == {resumed["mlflow_run_id"]: "FINISHED"}  # the killed run's own MLflow run
    assert tracked["loss_steps"][resumed["mlflow_run_id"]][-1] >= 5  # the resumed steps landed in it

    evaluate = run_medtee("train", *run, "trainer.validate_only=true", f"trainer.resume_from={checkpoints[1]}",
                          cwd=whole_dir)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    [evaluation] = [s for s in summaries(whole_dir) if s["mode"] == "validate"]
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


#: torchrun sets OMP_NUM_THREADS=1 for each process only when it starts several per node. The runs compared with
#: its 2-process run must have it too: bitsandbytes' OpenMP kernels (taken on CPUs without AVX-512) split their sums
#: by thread count, so another count rounds differently.
ONE_OMP_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ddp_run(owner, tmp_path_factory) -> tuple[Path, dict]:
    cwd = tmp_path_factory.mktemp("ddp")
    res = _torchrun(["-m", "medtee"], *data_args(owner), "trainer.max_steps=3", "trainer.strategy=ddp", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("data key released") == 2  # each process attested and obtained the key itself
    [summary] = summaries(cwd)  # rank 0 alone writes outputs
    return cwd, summary


def test_two_process_ddp_on_cpu_with_torchrun(ddp_run):
    cwd, summary = ddp_run
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (Path(summary["dir"]) / "adapter.safetensors.enc").exists()
    assert mlflow_state(cwd / "mlflow.db")["status"] == {summary["mlflow_run_id"]: "FINISHED"}


def test_two_nodes_train_as_one_node_with_two_processes(owner, ddp_run, tmp_path):
    """Multi-node through torchrun's launcher: an agent per node, each with its own working directory (as on two
    machines). Rank 0's node writes every output; the other node writes only its own signed receipt (its process
    had its own key release and evidence)."""
    _, ddp = ddp_run
    port, nodes = str(_free_port()), [tmp_path / "node0", tmp_path / "node1"]
    agents = []
    for rank, cwd in enumerate(nodes):
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "medtee", "train",
               *COMMON, *data_args(owner), "trainer.max_steps=3", "trainer.strategy=ddp", "hardware.num_nodes=2",
               "hardware.cpu_threads=1"]
        agents.append(subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ONE_OMP_THREAD, "PYTHONUNBUFFERED": "1"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [agent.communicate(timeout=300)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    [summary] = summaries(nodes[0])
    assert summary["world_size"] == 2 and summary["final_metrics"] == ddp["final_metrics"]
    assert [p.name for p in nodes[1].rglob("*") if p.is_file()] == ["receipt.rank1.dsse.json"]
    assert len(list(nodes[0].glob("outputs/*/*/receipt.dsse.json"))) == 1


def test_two_tasks_started_as_srun_starts_them_train_as_torchrun_does(owner, ddp_run, tmp_path):
    """SLURM: Lightning reads ranks and the rendezvous from the variables srun sets for each task."""
    _, ddp = ddp_run
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "medtee",
             "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "medtee", "train", *COMMON, *data_args(owner), "trainer.max_steps=3",
           "trainer.strategy=ddp", "hardware.devices=2", "hardware.cpu_threads=1"]
    tasks = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **slurm, **ONE_OMP_THREAD, "SLURM_PROCID": str(rank),
                                   "SLURM_LOCALID": str(rank),
                                   "PYTHONUNBUFFERED": "1"}) for rank in (0, 1)]
    errors = [task.communicate(timeout=300)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "SLURM" in errors[0]  # Lightning took the ranks from SLURM's variables
    [summary] = summaries(tmp_path)
    assert summary["world_size"] == 2 and summary["final_metrics"] == ddp["final_metrics"]


FSDP_ON_CPU = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(owner, ddp_run, tmp_path):
    """QLoRA (4-bit base) sharded by FSDP over 2 CPU processes: the same losses and adapter as the DDP run, a whole
    adapter gathered from the shards, and a resume from its step-2 checkpoint that ends where the run did."""
    ddp_cwd, ddp = ddp_run
    run = [*data_args(owner), "trainer.max_steps=3", "trainer.strategy=fsdp", "trainer.checkpoint_every_n_steps=2",
           "model.gradient_checkpointing=true"]  # recomputed inside each FSDP unit, as on the GPU profiles
    res = _torchrun(FSDP_ON_CPU, *run, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [fsdp] = summaries(tmp_path)
    assert fsdp["world_size"] == 2 and fsdp["steps"] == 3
    # FSDP and DDP compute the same function in another order of floating-point operations, and which kernels run
    # depends on the CPU. Adam divides by the gradient's magnitude, so where a gradient is near zero a rounding
    # difference moves a weight by up to the learning rate. Measured on one machine under three kernel sets
    # (ATEN_CPU_CAPABILITY=avx512, avx2, default): losses within 1.4e-4 relative, every adapter tensor within
    # 1.3e-3 relative (Frobenius), single entries up to 3e-4 apart. What is guaranteed: each entry is within Adam's
    # bound (2 x the summed learning rates), and a real fault (a shard, an untrained or half-loaded adapter) would
    # differ by ~100%, far outside 1e-2.
    assert fsdp["final_metrics"] == pytest.approx(ddp["final_metrics"], rel=1e-3)
    a, b = adapter_weights(fsdp["dir"], tmp_path), adapter_weights(ddp["dir"], ddp_cwd)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(a[k].shape == b[k].shape for k in a)  # whole tensors, not rank 0's shard
    lr = config.compose(["recipe=demo"]).trainer
    adam_bound = 2 * sum(lr.lr * lr_lambda(lr.warmup_steps, 3)(step) for step in range(3))
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= adam_bound, k
        assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-2, k
    assert all(float(b[k].abs().sum()) > 0 for k in b if "lora_B" in k)  # trained, not the zero init

    [checkpoint] = Path(fsdp["dir"]).glob("checkpoints/*.ckpt.enc")
    assert checkpoint.name == "step-0000002.ckpt.enc"
    res = _torchrun(FSDP_ON_CPU, *run, f"trainer.resume_from={checkpoint}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [resumed] = [s for s in summaries(tmp_path) if s["resumed"]]
    assert resumed["steps"] == 3 and resumed["mlflow_run_id"] == fsdp["mlflow_run_id"]
    assert resumed["final_metrics"]["train/loss"] == fsdp["final_metrics"]["train/loss"]
    c = adapter_weights(resumed["dir"], tmp_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
