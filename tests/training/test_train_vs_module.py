"""`medtee train` computes exactly what the benchmarked module path computes: `benchmarks/train_vs_module.py` runs
both on the same batches and compares the loss step by step (speed is the benchmark's to print, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_vs_module.py"


def test_train_and_the_module_path_give_the_same_losses(tmp_path):
    res = run_python(SCRIPT, "recipe=demo", "trainer.max_steps=5", "trainer.lr=2e-2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    steps, summary = lines[:-1], lines[-1]
    assert [s["step"] for s in steps] == list(range(5))
    assert steps[0]["train_loss"] - steps[-1]["train_loss"] > 0.1  # the steps really train (LoRA B moves off 0)
    assert summary["max_rel_loss_diff"] <= 1e-6, steps


def test_a_recipe_the_replay_cannot_follow_is_refused(tmp_path):
    res = run_python(SCRIPT, "recipe=demo", "trainer.accumulate_grad_batches=2", cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "one micro-batch per step" in res.stderr and list(tmp_path.iterdir()) == []
