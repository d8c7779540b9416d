"""`medtee train` with `model.source=random`: the whole chain on random weights of an architecture's shape.

The gemma3_27b entry is scaled down inside the run's process so that it fits two CPU cores; everything else is the
path a GPU run takes (tests/training/test_model.py checks the real shape)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import run_python

from .conftest import adapter_weights, summaries

pytestmark = pytest.mark.slow

SMALL_GEMMA3 = dict(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                    max_position_embeddings=4096)

SCRIPT = f"""
import sys
from medtee import cli
from medtee.training.config import ARCHITECTURES, Architecture
ARCHITECTURES[Architecture.gemma3_27b] = {SMALL_GEMMA3!r}
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_train_on_random_weights_of_an_architecture(tmp_path):
    args = ["model.source=random", "model.num_layers=2", "model.init_seed=3", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "data.n_synthetic=60"]
    res = run_python(SCRIPT, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIMULATED" in res.stderr
    [summary] = summaries(tmp_path)
    assert summary["steps"] == 4
    recorded = json.loads((tmp_path / summary["dir"] / "recipe.json").read_text())["model"]
    assert (recorded["source"], recorded["architecture"], recorded["num_layers"], recorded["init_seed"]) == \
        ("random", "gemma3_27b", 2, 3)
    [tag] = sqlite3.connect(tmp_path / "mlflow.db").execute(
        "select value from tags where key='medtee.model.id'").fetchone()
    assert tag == "random gemma3_27b weights, 2 layers (model.init_seed=3)"
    weights = adapter_weights(summary["dir"], tmp_path)
    layers = {name.split(".layers.")[1].split(".")[0] for name in weights}
    assert layers == {"0", "1"}
    [q_a] = [w for name, w in weights.items() if "layers.0.self_attn.q_proj.lora_A" in name]
    assert q_a.shape[1] == SMALL_GEMMA3["hidden_size"]
