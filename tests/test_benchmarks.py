"""The benchmarks still run: the GPU one in its CPU smoke mode (it builds its sides from the shipped recipe files, so
a change to conf/ or to medtee.training that it cannot follow fails here, not on the next GPU machine), and the
audit log's on a small log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_gpu.py"


def test_qlora_benchmark_smoke_run_on_cpu(shared, tmp_path):
    res = subprocess.run([sys.executable, str(BENCH), "--shared", str(shared), "--tiny", "--no-quant", "--seq", "64",
                          "--batch", "2", "--steps", "1", "--warmup", "1", "--layers", "1", "2",
                          "--models", "medgemma_27b:compile_layers=false", "medgemma_27b_lowmem:compile_layers=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert not [line for line in lines if "error" in line], lines
    runs = [line for line in lines if line.get("side") == "medtee" and "layers" in line]
    assert {(r["model_conf"].split(":")[0], r["layers"]) for r in runs} == \
        {(m, n) for m in ("medgemma_27b", "medgemma_27b_lowmem") for n in (1, 2)}
    assert {tuple(sorted(r["checkpointing"])) for r in runs if r["model_conf"].startswith("medgemma_27b_lowmem")} == \
        {("full",)}
    assert "ratio medtee/baseline:" in res.stdout


def test_audit_log_benchmark_runs(tmp_path):
    bench = BENCH.parent / "audit_log.py"
    res = subprocess.run([sys.executable, str(bench), "--entries", "50", "--n", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ratio to fresh log") == 2 and "with mark" in res.stdout, res.stdout
