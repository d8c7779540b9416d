"""Shared by the training tests that run `medtee train` in new processes: a sealed dataset, and readers of what a
run leaves (summaries, the decrypted adapter, the MLflow store), and a pretrained model's folder."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_medtee

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


def data_args(owner: Path) -> list[str]:
    return [f"data.path={owner / 'sealed'}", f"broker.dir={owner / '.medtee/broker'}"]


def summaries(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"dir": str(p.parent)} for p in sorted(cwd.glob("outputs/*/*/summary.json"))]


def adapter_weights(out_dir: str, cwd: Path) -> dict:
    from safetensors.torch import load_file

    from medtee.training.output import open_adapter

    opened = open_adapter(Path(out_dir) / "adapter.safetensors.enc", cwd / ".medtee/keys/dev-recipient.key",
                          cwd / "opened" / Path(out_dir).name)
    return load_file(opened / "adapter_model.safetensors")


def mlflow_state(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        runs = dict(con.execute("select run_uuid, status from runs"))
        steps = {r: sorted(s for (s,) in con.execute(
            "select step from metrics where run_uuid=? and key='train/loss'", (r,))) for r in runs}
        return {"status": runs, "loss_steps": steps}
    finally:
        con.close()


def save_tiny_pretrained(path: Path, *, vocab_size: int | None = None) -> Path:
    """The demo recipe's tiny model (random weights) and the demo tokenizer as save_pretrained writes them: a
    pretrained model's folder (`model.source=pretrained model.id=PATH`). `vocab_size` defaults to the tokenizer's."""
    from medtee import config
    from medtee.data.tokenizer import build_demo_tokenizer
    from medtee.training import model as model_lib
    from medtee.training.config import QLoRAConfig, Quantization

    tokenizer = build_demo_tokenizer()
    model_cfg = config.compose(["recipe=demo"]).model
    base = model_lib.load_base_model(model_cfg, QLoRAConfig(quantization=Quantization.none),
                                     vocab_size=vocab_size or len(tokenizer), device="cpu")
    base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
