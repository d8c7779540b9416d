"""Training metrics leave only as windows over at least `tracking.min_aggregate` dialogues (docs/privacy.md): with
`data.batch_size=1 trainer.log_every_n_steps=1` no MLflow value, progress-bar value or final metric is one dialogue's
loss. The guard refuses a window that covers too few; the module keeps the window open until it covers enough."""

from __future__ import annotations

import json
import sqlite3

import pytest
from lightning.pytorch.loggers import Logger

from conftest import run_medtee
from medtee import config
from medtee.crypto.stream import derive_key
from medtee.tracking.guard import Guard


def test_the_guard_refuses_a_window_of_too_few_dialogues():
    guard = Guard(None, 20)
    values = {"train/loss": 2.5, "train/tokens_per_s": 900.0, "train/lr": 0.01}
    assert guard.window(values, dialogues=19) == {"train/lr": 0.01}  # the step's schedule is not data
    assert guard.window(values, dialogues=20) == values


class GuardedRecorder(Logger):
    """What reaches the logger: Lightning's calls (`log_metrics`) and the module's windows (`log_window`)."""

    name, version = "recorder", 0

    def __init__(self, min_aggregate: int):
        super().__init__()
        self.guard = Guard(None, min_aggregate)
        self.lightning: list[tuple[int, dict]] = []
        self.windows: list[tuple[int, int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.lightning.append((step, dict(metrics)))

    def log_window(self, metrics, *, dialogues, step):
        self.windows.append((step, dialogues, self.guard.window(metrics, dialogues=dialogues)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _train(tmp_path, *, min_aggregate: int, steps: int = 7, accumulate: int = 1):
    from medtee.data.module import DialogueDataModule
    from medtee.data.synthetic import generate_dialogues
    from medtee.data.tokenizer import build_demo_tokenizer
    from medtee.training.checkpoint import EncryptedCheckpointIO
    from medtee.training.engine import build_trainer
    from medtee.training.model import build_model
    from medtee.training.module import CausalLMModule

    cfg = config.compose(["recipe=demo", "qlora=unquantized", "data.max_length=64", "data.batch_size=1",
                          f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
                          f"trainer.accumulate_grad_batches={accumulate}"])
    tokenizer = build_demo_tokenizer()
    data = DialogueDataModule(generate_dialogues(30, seed=1), tokenizer, max_length=64, batch_size=1,
                              val_fraction=0.0, seed=0)
    data.setup("fit")
    module = CausalLMModule(build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device="cpu"), cfg.trainer,
                            min_aggregate=min_aggregate)
    losses = []  # each batch's own loss: what must never be logged on its own
    original = module._train_loss

    def recorded(batch):
        loss = original(batch)
        losses.append(float(loss.detach()))
        return loss

    module._train_loss = recorded
    recorder = GuardedRecorder(min_aggregate)
    trainer = build_trainer(cfg.trainer, cfg.hardware, metrics=("train/loss",), model=module.model, logger=recorder,
                            out_dir=tmp_path, checkpoint_io=EncryptedCheckpointIO(derive_key(b"\x01" * 32, "a" * 64)))
    trainer.fit(module, datamodule=data)
    return module, trainer, recorder, losses


def test_batch_size_one_logs_only_windows_of_min_aggregate_dialogues(tmp_path):
    module, trainer, recorder, losses = _train(tmp_path, min_aggregate=3)
    assert len(losses) == 7
    # Lightning's own path never carries a batch's loss or throughput
    assert not any(k in m for _, m in recorder.lightning for k in ("train/loss", "train/tokens_per_s"))
    assert any("train/lr" in m for _, m in recorder.lightning)
    # steps 0-2 and 3-5 close a window of 3 dialogues; step 6 stays open (1 dialogue)
    assert [(step, n) for step, n, _ in recorder.windows] == [(2, 3), (5, 3)]
    for (_, _, values), k in zip(recorder.windows, (0, 3)):
        assert values["train/loss"] == pytest.approx(sum(losses[k:k + 3]) / 3, rel=1e-5)
        assert values["train/tokens_per_s"] > 0
    singles = set(losses)
    assert not any(v in singles for _, _, values in recorder.windows for v in values.values())
    # the final metric (the run summary's) and the progress bar hold the last window, the first_loss the first's
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(recorder.windows[-1][2]["train/loss"])
    assert module.first_loss == pytest.approx(recorder.windows[0][2]["train/loss"])
    assert float(trainer.progress_bar_metrics["train/loss"]) == pytest.approx(recorder.windows[-1][2]["train/loss"])


def test_a_run_shorter_than_one_window_logs_no_training_loss(tmp_path):
    module, trainer, recorder, losses = _train(tmp_path, min_aggregate=20, steps=4)
    assert len(losses) == 4 and recorder.windows == []
    assert "train/loss" not in trainer.callback_metrics and module.first_loss is None


def test_accumulated_batches_count_into_the_window(tmp_path):
    module, trainer, recorder, losses = _train(tmp_path, min_aggregate=4, steps=3, accumulate=2)
    assert len(losses) == 6  # 3 optimizer steps of 2 batches: windows close at optimizer steps 2 (4 dialogues)
    assert [(step, n) for step, n, _ in recorder.windows] == [(1, 4)]
    assert recorder.windows[0][2]["train/loss"] == pytest.approx(sum(losses[:4]) / 4, rel=1e-5)


@pytest.mark.slow
def test_medtee_train_sends_mlflow_no_single_dialogue_loss(tmp_path):
    """The review's reproduction, at the default tracking.min_aggregate (20): two dialogues a step and a log every
    step give MLflow one value per 10 steps, and no val/* (two held-out dialogues per pass)."""
    res = run_medtee("train", "trainer.max_steps=20", "data.batch_size=2", "trainer.log_every_n_steps=1",
                     "trainer.limit_val_batches=1", "trainer.val_check_interval=10", "trainer.enable_progress_bar=false",
                     cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "mlflow.db")
    rows = con.execute("select key, step, value from metrics").fetchall()
    con.close()
    loss = sorted((step, value) for key, step, value in rows if key == "train/loss")
    assert [step for step, _ in loss] == [9, 19]
    assert sorted(step for key, step, _ in rows if key == "train/tokens_per_s") == [9, 19]
    assert not any(key.startswith("val/") for key, _, _ in rows)  # 2 held-out dialogues < min_aggregate
    assert sorted(step for key, step, _ in rows if key == "train/lr") == list(range(20))
    [summary] = tmp_path.glob("outputs/*/*/summary.json")
    assert json.loads(summary.read_text())["final_metrics"]["train/loss"] == pytest.approx(loss[-1][1])
    assert f"train/loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f}" in res.stderr  # the first and last windows


def test_the_progress_bar_shows_validation_only_of_a_pass_over_min_aggregate_rows():
    """`val/loss` of a pass over one held-out dialogue (data.batch_size=1 trainer.limit_val_batches=1) is that
    dialogue's loss: MLflow drops it, and so does the progress bar."""
    from types import SimpleNamespace

    from medtee.containment import progress_bars

    [bar] = progress_bars(True, ["train/loss", "val/loss", "val/perplexity"])
    trainer = SimpleNamespace(loggers=[], progress_bar_metrics={"train/loss": 2.0, "val/loss": 3.0,
                                                               "val/perplexity": 20.0, "v_num": 1})
    for rows, shown in ((1, {"train/loss"}), (19, {"train/loss"}), (20, {"train/loss", "val/loss", "val/perplexity"})):
        module = SimpleNamespace(min_aggregate=20, val_examples=rows)
        assert set(bar.get_metrics(trainer, module)) == shown
