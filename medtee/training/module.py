"""The Lightning module: causal-LM loss on the doctor's turns, LoRA parameters only, allow-listed metrics only."""

from __future__ import annotations

import math
import time

import lightning as L
import torch

from medtee.training.loss import chunked_causal_lm_loss


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class CausalLMModule(L.LightningModule):
    """Wraps a peft model. Logs only `train/*` and `val/*` aggregates; never batch contents.

    `train/loss` and `train/tokens_per_s` are window values: at a logging step (every `trainer.log_every_n_steps`
    optimizer steps), the mean over every training batch since the last logged value, once those cover at least
    `min_aggregate` dialogues (the run's `tracking.min_aggregate`); until then the window goes on to the
    next logging step. They reach MLflow through the logger's `log_window` (checked by the guard) and Lightning's
    progress bar and callback metrics (the run's final `train/loss`) only as such a window; `first_loss` is the first
    window's. The open window is checkpointed, so a resumed run closes it where the uninterrupted one would have.

    Checkpoints hold the trainable (LoRA) parameters only, plus the RNG states and `run_info` (e.g. the MLflow run
    id); the frozen base is rebuilt from the recipe on resume.

    `dp` (a DPConfig, enabled): DP-SGD (medtee.training.dp) over `dataset_size` training dialogues in Poisson-sampled
    batches of expected size `batch_size` (training refuses a loader that samples otherwise); the accountant's state
    is checkpointed, `train/epsilon` logged each epoch, `dp_summary()` the run's record. Per-dialogue clipping
    replaces the trainer's gradient clipping. An empty batch is a step like any other (noise only). Under DP no
    `train/loss` (nor the run's first loss) and no `train/tokens_per_s` is logged: the guarantee covers the adapter,
    not what a step's batch says directly.
    """

    PREFIX = "model."  # of the peft model's entries in this module's state dict

    def __init__(self, model, trainer_cfg, *, run_info: dict | None = None, dp=None, dataset_size: int = 0,
                 batch_size: int = 0, min_aggregate: int = 1):
        super().__init__()
        self.model = model
        self.cfg = trainer_cfg
        self.run_info = dict(run_info or {})
        # names before any engine wraps the layers (FSDP's full state dicts use these names too)
        self.trainable = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        self._adapter_names = _adapter_names(model, prefix=self.PREFIX)
        self.strict_loading = False  # checkpoints carry the adapter, not the frozen base weights
        self.min_aggregate = min_aggregate
        self.val_examples = 0  # this process's held-out rows in the current validation pass (the progress bar's gate)
        self._window = _Window()
        self._stepped = 0  # the optimizer steps seen by on_train_batch_end
        self._rng_to_restore: dict | None = None
        self.first_loss: float | None = None  # this run's first training loss (the "before" of the run's summary)
        self.dp = None
        if dp is not None and dp.enabled:
            from medtee.training.dp import PrivateTraining

            self.dp = PrivateTraining(model, dp, dataset_size=dataset_size, batch_size=batch_size,
                                      steps=trainer_cfg.max_steps)

    def _loss(self, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self.cfg.loss_chunk_tokens <= 0:
            return self.model(**inputs, labels=batch["labels"]).loss
        causal = self.model.get_base_model()
        hidden = causal.model(**inputs).last_hidden_state
        return chunked_causal_lm_loss(hidden, causal.lm_head, batch["labels"], chunk_tokens=self.cfg.loss_chunk_tokens,
                                      softcap=getattr(causal.config, "final_logit_softcapping", None))

    def _train_loss(self, batch) -> torch.Tensor:
        if self.dp is None:
            return self._loss(batch)
        from medtee.training.dp import dialogue_losses

        # the mean of per-dialogue losses: each dialogue's gradient is its own, to be clipped on its own
        return dialogue_losses(self.model.get_base_model(), batch, chunk_tokens=self.cfg.loss_chunk_tokens).mean()

    def dp_summary(self) -> dict | None:
        """The run's differential-privacy record (medtee.training.dp.PrivateTraining.summary); None without DP."""
        return self.dp.summary() if self.dp is not None else None

    def adapter_state(self, state_dict: dict) -> dict:
        """The adapter, as peft saves it, from this module's (full) state dict."""
        return {self._adapter_names[k]: v for k, v in state_dict.items() if k in self._adapter_names}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self.trainable}
        # the checkpoint callback saves at a step's end before this module's hook closes that step's window: a window
        # about to be logged is saved closed, so a resumed run logs what the uninterrupted one did
        step = self.trainer.global_step if self._trainer is not None else None
        window = _Window() if step is not None and step != self._stepped and self._window_closes(step) else self._window
        checkpoint["medtee"] = {"run_info": dict(self.run_info), "rng": _rng_states(),
                                "train_window": window.state_dict()}
        if self.dp is not None:
            checkpoint["medtee"]["dp_accountant"] = self.dp.state_dict()

    def adapter_mismatch(self, checkpoint: dict) -> str | None:
        """Why the checkpoint's adapter cannot load into this module (names and shapes; loading is not strict)."""
        found = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        if found == self.trainable:
            return None
        missing, unexpected = self.trainable.keys() - found.keys(), found.keys() - self.trainable.keys()
        reshaped = sorted(k for k in found.keys() & self.trainable.keys() if found[k] != self.trainable[k])
        shapes = (f", {len(reshaped)} of another shape (e.g. {found[reshaped[0]]} where this recipe has "
                  f"{self.trainable[reshaped[0]]}: another qlora.rank?)" if reshaped else "")
        return (f"the checkpoint's adapter does not match this recipe's: {len(missing)} LoRA tensors missing, "
                f"{len(unexpected)} unexpected{shapes}; resume with the qlora settings of the run that wrote it")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        mismatch = self.adapter_mismatch(checkpoint)
        if mismatch:  # a different adapter must not half-load
            raise ValueError(mismatch)
        saved = checkpoint.get("medtee", {})
        self.run_info = {**saved.get("run_info", {}), **self.run_info}
        self._rng_to_restore = saved.get("rng")
        self._window = _Window.from_state(saved.get("train_window"))
        if self.dp is not None:
            if "dp_accountant" not in saved and checkpoint.get("global_step", 0):
                raise ValueError("the checkpoint was written by a run without privacy.dp: its steps were never "
                                 "accounted, so no DP guarantee can cover the resumed run")
            self.dp.load_state_dict(saved.get("dp_accountant", {"history": []}))

    def on_train_start(self) -> None:
        if self.dp is not None:
            self.dp.check_sampling(self.trainer.train_dataloader)
        self._stepped = self.trainer.global_step if self._trainer is not None else 0  # (or driven by hand)
        if self._rng_to_restore is not None:  # after the sanity pass, exactly where the checkpointed run stood
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch, batch_idx):
        loss = self._train_loss(batch)
        n = batch["input_ids"].shape[0]  # rows: one dialogue each, or several when packed (never part of one)
        # under DP no training loss leaves the run, not even a window's: the DP guarantee covers the adapter only.
        # Without DP, a step's loss is as few as one dialogue's (data.batch_size=1): it only joins the window.
        if n and self.dp is None:
            self._window.add(loss.detach(), dialogues=n, tokens=int(batch["input_ids"].numel()))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._window.start()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        step = self.trainer.global_step
        if step == self._stepped:  # a batch accumulated: the optimizer has not stepped
            return
        self._stepped = step
        if self._window_closes(step):
            self._log_window(step - 1)  # Lightning's step index for this batch's metrics

    def _window_closes(self, step: int) -> bool:
        """Whether the window is logged at the end of optimizer step `step`: a logging step (Lightning's too), no DP,
        and at least `min_aggregate` dialogues in it (else it goes on to the next logging step)."""
        every = self.trainer.log_every_n_steps
        return (self.dp is None and bool(every) and (step % every == 0 or self.trainer.should_stop)
                and self._window.dialogues >= max(1, self.min_aggregate))

    def _log_window(self, step: int) -> None:
        """Log the open window (as `step`) and start a new one."""
        w = self._window
        loss = w.loss_sum / w.dialogues
        values = {"train/loss": float(loss)}
        elapsed = time.perf_counter() - w.t0 if w.t0 is not None else 0.0
        if elapsed > 0:
            values["train/tokens_per_s"] = w.tokens / elapsed
        # the progress bar and the callback metrics (the run's final train/loss); never Lightning's logger path
        self.log("train/loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False,
                 batch_size=w.dialogues)
        if "train/tokens_per_s" in values:
            self.log("train/tokens_per_s", values["train/tokens_per_s"], logger=False, on_step=True, on_epoch=False)
        for logger in self.loggers:
            log_window = getattr(logger, "log_window", None)
            if log_window is not None:
                log_window(values, dialogues=w.dialogues, step=step)
            else:  # not medtee's MLflow door (a test's recorder)
                logger.log_metrics(values, step=step)
        if self.first_loss is None:
            self.first_loss = values["train/loss"]
        self._window = _Window()

    def on_train_epoch_end(self):
        if self.dp is not None:
            self.log("train/epsilon", self.dp.spent_epsilon(), on_step=False, on_epoch=True)

    def on_validation_epoch_start(self):
        self.val_examples = 0

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.val_examples += batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)  # the mean over every process's held-out batches

    def on_validation_epoch_end(self):
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/perplexity", torch.exp(val.detach().clamp(max=20.0)), sync_dist=True)  # same on every rank

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.dp is not None:  # DPOptimizer clips each dialogue's gradient; the batch's `.grad` is replaced
            return
        if gradient_clip_val and isinstance(self.trainer.model, FullyShardedDataParallel):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # the norm over every shard, as on one device
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        else:
            fused = bool(params) and params[0].is_cuda
            opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        if self.dp is not None:
            opt = self.dp.optimizer(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.warmup_steps, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Window:
    """The training batches since the last logged window: their summed loss (each batch's mean loss times its rows,
    kept on the device: no sync per step), rows (dialogues) and tokens, and when its first batch started."""

    def __init__(self, loss_sum=0.0, dialogues: int = 0, tokens: int = 0):
        self.loss_sum, self.dialogues, self.tokens = loss_sum, dialogues, tokens
        self.t0: float | None = None

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, *, dialogues: int, tokens: int) -> None:
        self.loss_sum = self.loss_sum + loss.float() * dialogues
        self.dialogues += dialogues
        self.tokens += tokens

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "dialogues": self.dialogues, "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict | None) -> "_Window":
        state = state or {}
        return cls(float(state.get("loss_sum", 0.0)), int(state.get("dialogues", 0)), int(state.get("tokens", 0)))


def _adapter_names(peft_model, *, prefix: str) -> dict[str, str]:
    """{name in the module's state dict: name in the saved adapter}. Asked of peft while the layers are unwrapped
    (it finds adapter entries by walking the model's modules, whose names FSDP changes)."""
    from peft import get_peft_model_state_dict

    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    markers = {n: torch.tensor(i) for i, n in enumerate(names)}
    saved = get_peft_model_state_dict(peft_model, state_dict=markers, save_embedding_layers=False)
    return {prefix + names[int(marker)]: key for key, marker in saved.items()}


def _rng_states() -> dict:
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
