"""The Lightning Trainer for a recipe: engine (one device, DDP, FSDP), precision, encrypted checkpointing.

Several devices or nodes: start one process per device with torchrun or SLURM (`srun`); Lightning reads the rank
from their environment variables. Every process then attests and obtains the data key itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

# Lightning 2.6 calls a torch API that torch 2.13 deprecated; the warning is about Lightning, not the run
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def strategy(trainer_cfg, model):
    """Lightning strategy for `trainer.strategy` (auto | ddp | fsdp)."""
    if trainer_cfg.strategy == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    if trainer_cfg.strategy == "fsdp":
        # use_orig_params: the optimizer sees the LoRA parameters, not FSDP's flat ones
        return EncryptedFSDPStrategy(auto_wrap_policy=fsdp_wrap_policy(model), use_orig_params=True,
                                     sharding_strategy="FULL_SHARD", state_dict_type="full", limit_all_gathers=True)
    return "auto"


class EncryptedFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with full (gathered) checkpoints, resumed through the checkpoint IO: Lightning's own
    `load_checkpoint` opens the file itself, which an encrypted checkpoint is not."""

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(path)  # every process decrypts it in its own memory
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False)):
            # the adapter only: loading is not strict, the frozen base was rebuilt from the recipe
            self.model.load_state_dict(checkpoint["state_dict"], strict=self.lightning_module.strict_loading)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
                for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=True):
                    # saved keyed by parameter index (as one device saves it), FSDP loads by parameter name
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint


def fsdp_wrap_policy(model):
    """FSDP units: each decoder layer (frozen weights and norms, one dtype) and, on their own, the LoRA matrices
    inside it, so trainable parameters (and their dtype) never share a flat parameter with frozen ones."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    from medtee.training.model import decoder_layers

    layer_types = tuple({type(layer) for layer in decoder_layers(model)})

    def wrap(module) -> bool:
        weight = getattr(module, "weight", None)
        trainable_leaf = next(module.children(), None) is None and weight is not None and weight.requires_grad
        return isinstance(module, layer_types) or trainable_leaf

    return CustomPolicy(wrap)


def build_trainer(trainer_cfg, hardware_cfg, *, metrics, model, logger, out_dir: Path, checkpoint_io):
    """Trainer for the `trainer` and `hardware` groups, showing only `metrics` on its progress bar; `checkpoint_io`
    (an EncryptedCheckpointIO holding the key derived from the released data key) writes and reads checkpoints."""
    from medtee import containment
    from medtee.training.checkpoint import EncryptedModelCheckpoint

    t, hw = trainer_cfg, hardware_cfg
    containment.quiet_lightning()
    checkpoints = []
    if t.checkpoint_every_n_steps > 0 and not t.validate_only:
        checkpoints.append(EncryptedModelCheckpoint(out_dir / "checkpoints", every_n_steps=t.checkpoint_every_n_steps,
                                                    keep=t.checkpoint_keep))
    return L.Trainer(
        accelerator=hw.accelerator.value, devices=hw.devices, num_nodes=hw.num_nodes,
        strategy=strategy(t, model), plugins=[checkpoint_io], max_steps=t.max_steps,
        callbacks=checkpoints + containment.progress_bars(t.enable_progress_bar, metrics),
        precision=t.precision.value, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=bool(checkpoints), enable_model_summary=False, logger=logger,
        default_root_dir=str(out_dir),
    )
