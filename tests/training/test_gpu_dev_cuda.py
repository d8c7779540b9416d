"""hardware=gpu_dev on a CUDA GPU (skipped without one): `medtee train` runs the whole chain there, SIMULATED, and
selective checkpointing keeps bitsandbytes' CUDA 4-bit matmul outputs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_medtee

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_demo_gpu_runs_the_whole_chain_on_cuda(tmp_path):
    res = run_medtee("train", "recipe=demo_gpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
                     "trainer.limit_val_batches=5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIMULATED" in res.stderr
    [summary_file] = tmp_path.glob("outputs/*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["steps"] == 6
    out = summary_file.parent
    assert (out / "adapter.safetensors.enc").is_file() and (out / "adapter.sealed").is_file()
    assert (out / "receipt.dsse.json").is_file()
    verified = run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), "--policy", "simulated", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


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
