"""hardware=gpu_dev on a CUDA GPU (skipped without one): `medtee train` runs the whole chain there, SIMULATED, and
selective checkpointing keeps bitsandbytes' CUDA 4-bit matmul outputs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_medtee, seal_and_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


DATA = ["recipe=demo_gpu", "data=sealed", "data.path=sealed", "data.val_fraction=0.2"]  # 120 dialogues: 24 held out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """120 synthetic dialogues sealed (simulated policy) and trained on with recipe=demo_gpu: (cwd, run directory)."""
    cwd = tmp_path_factory.mktemp("cuda")
    out, stderr = seal_and_train(cwd, *DATA, "trainer.max_steps=6", "trainer.val_check_interval=3")
    assert "SIMULATED" in stderr
    return cwd, out


def test_demo_gpu_runs_the_whole_chain_on_cuda(trained):
    cwd, out = trained
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "adapter.safetensors.enc").is_file() and (out / "adapter.sealed").is_file()
    verified = run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), cwd=cwd)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_eval_run_on_cuda(trained):
    cwd, out = trained
    res = run_medtee("eval", "run", *DATA, f"evaluation.adapter={out / 'adapter.sealed'}", "evaluation.max_items=20",
                     "evaluation.max_new_tokens=16", "evaluation.resamples=1000", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: evaluated 24 held-out dialogues" in res.stderr


def test_dp_under_bf16_autocast_on_cuda(trained):
    cwd, _ = trained
    res = run_medtee("train", *DATA, "data.packing=false", "privacy.dp.enabled=true", "privacy.dp.target_delta=1e-3",
                     "trainer.max_steps=6", "trainer.val_check_interval=3", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(sorted(cwd.glob("outputs/*/*/summary.json"))[-1].read_text())
    assert summary["privacy"]["dp"]["steps"] == 6 and summary["privacy"]["dp"]["epsilon"] <= 8.0


def test_selective_checkpointing_keeps_the_cuda_4bit_matmul_outputs():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from medtee import config
    from medtee.training import model as model_lib

    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func] += 1
            return func(*args, **(kwargs or {}))

    def gemm_runs(*overrides: str) -> int:
        cfg = config.compose(["recipe=demo_gpu", "model.tiny.num_hidden_layers=4", "model.dtype=bfloat16",
                              *overrides])
        model = model_lib.build_model(cfg.model, cfg.qlora, vocab_size=1024, device="cuda")
        ids = torch.randint(3, 1024, (2, 64), device="cuda")
        counts.clear()
        with Count(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return counts[torch.ops.bitsandbytes.gemm_4bit.default]

    assert gemm_runs() == 28
    assert gemm_runs("model.gradient_checkpointing=true", "model.checkpoint_every_n_layers=1") == 56
    assert gemm_runs("model.gradient_checkpointing=true", "model.checkpoint_every_n_layers=2",
                     "model.selective_checkpointing=true") == 42
