"""The Lightning Trainer for a recipe: engine (one device, DDP, FSDP), precision, encrypted checkpointing.

Several devices or nodes: start one process per device with torchrun or SLURM (`srun`); Lightning reads the rank
from their environment variables. Every process then attests and obtains the data key itself.
"""

from __future__ import annotations

from pathlib import Path


def strategy(trainer_cfg, model):
    """Lightning strategy for `trainer.strategy` (auto | ddp | fsdp); FSDP wraps each decoder layer."""
    if trainer_cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    if trainer_cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from medtee.training.model import decoder_layers

        layer_types = {type(layer) for layer in decoder_layers(model)}
        # use_orig_params: frozen (4-bit) and trainable (LoRA) parameters share each wrapped layer.
        return FSDPStrategy(auto_wrap_policy=layer_types, use_orig_params=True, sharding_strategy="FULL_SHARD",
                            state_dict_type="full", limit_all_gathers=True)
    return "auto"


def build_trainer(cfg, *, model, logger, out_dir: Path, checkpoint_key: bytes | None):
    """Trainer for the recipe; encrypted checkpoints (and resuming) need `checkpoint_key`."""
    import lightning as L

    from medtee import config, privacy
    from medtee.training.checkpoint import EncryptedCheckpointIO, checkpoint_callback

    t, hw = cfg.trainer, cfg.hardware
    checkpoints, plugins = [], []
    if checkpoint_key is not None:
        plugins.append(EncryptedCheckpointIO(checkpoint_key))
        if t.checkpoint_every_n_steps > 0 and not t.validate_only:
            checkpoints.append(checkpoint_callback(out_dir / "checkpoints", every_n_steps=t.checkpoint_every_n_steps,
                                                   keep=t.checkpoint_keep))
    elif t.checkpoint_every_n_steps > 0 or t.resume_from:
        raise ValueError("encrypted checkpoints need the checkpoint key derived from the released data key")
    return L.Trainer(
        accelerator=hw.accelerator.value, devices=hw.devices, num_nodes=hw.num_nodes,
        strategy=strategy(t, model), plugins=plugins, max_steps=t.max_steps,
        callbacks=checkpoints + privacy.progress_bars(t.enable_progress_bar,
                                                      cfg.tracking.metrics or config.METRIC_ALLOW_LIST),
        precision=t.precision.value, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=bool(checkpoints), enable_model_summary=False, logger=logger,
        default_root_dir=str(out_dir),
    )
