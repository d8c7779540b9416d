"""The Lightning module: causal-LM loss on the doctor's turns, LoRA parameters only, allow-listed metrics only."""

from __future__ import annotations

import math
import time

import lightning as L
import torch


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class CausalLMModule(L.LightningModule):
    """Wraps a peft model. Logs only `train/*` and `val/*` aggregates; never batch contents."""

    def __init__(self, model, trainer_cfg):
        super().__init__()
        self.model = model
        self.cfg = trainer_cfg
        self._t0: float | None = None
        self._tokens = 0

    def _loss(self, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        return self.model(**inputs).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        n = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self._tokens += int(batch["input_ids"].numel())
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        if elapsed > 0:
            self.log("train/tokens_per_s", self._tokens / elapsed, on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self):
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/perplexity", torch.exp(val.detach().clamp(max=20.0)))

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        else:
            fused = bool(params) and params[0].is_cuda
            opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.warmup_steps, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
