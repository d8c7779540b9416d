"""Encrypted training checkpoints: Lightning's checkpoint dict, serialized in memory, encrypted, written atomically.

The key is derived from the released data key and the sealed dataset's content digest, so only a run whose
attestation released that dataset's key again can read a checkpoint back (resuming means attesting again). The
cipher and the file format (versioned; every format written before still opens) are `medtee.crypto.stream`.
A checkpoint holds the LoRA parameters, optimizer, scheduler, loop and data-loader positions, RNG states and the
MLflow run id (see `training.module.CausalLMModule`); never the frozen base weights and never plaintext on disk.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from medtee.crypto.stream import StreamError, decrypt, encrypt
from medtee.files import write_atomic

SUFFIX = ".ckpt.enc"


class CheckpointError(ValueError):
    """A checkpoint cannot be read back: the message names the file and the likely cause, never its contents."""


class EncryptedCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO: torch.save into memory, encrypt, write atomically; the reverse on load."""

    def __init__(self, key: bytes, *, earlier: tuple[bytes, ...] = ()):
        self._key, self._earlier = key, earlier  # earlier: keys of an earlier derivation a checkpoint may be under
        self._held: tuple[Path, dict] | None = None  # a checkpoint `inspect` decrypted, for Lightning's load
        self.last_written: str | None = None  # SHA-256 of the newest file written (what the run's close reports)
        self.last_written_step: int | None = None  # and the training step it holds

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = encrypt(buffer.getbuffer(), self._key)
        write_atomic(path, blob)
        self.last_written = hashlib.sha256(blob).hexdigest()  # of the bytes written, not read back from the disk
        self.last_written_step = checkpoint.get("global_step")

    def inspect(self, path, *, sha256: str | None = None) -> dict:
        """The checkpoint at `path`, decrypted once: Lightning's next load of the same path gets this dict. `sha256`:
        the digest the recipe recorded of the file (CheckpointError if the bytes read now are another file's)."""
        checkpoint = self.load_checkpoint(path, sha256=sha256)
        self._held = (Path(path), checkpoint)
        return checkpoint

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None, *,
                        sha256: str | None = None) -> dict:
        import torch

        path = Path(path)
        if self._held is not None and self._held[0] == path:
            checkpoint, self._held = self._held[1], None
            return checkpoint
        if not path.is_file():
            raise CheckpointError(f"trainer.resume_from={path}: no such checkpoint file")
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"trainer.resume_from={path} is not the file the recipe digest covers: it was replaced "
                                  f"after the run hashed it; resume again")
        try:
            plaintext = decrypt(data, self._key, name=str(path), earlier=self._earlier)
        except StreamError as exc:
            raise CheckpointError(str(exc)) from None
        # Authenticated above with a key only this attested run holds: the pickled RNG states are trusted.
        return torch.load(io.BytesIO(plaintext), map_location=map_location or "cpu", weights_only=False)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def resume_info(io: EncryptedCheckpointIO, path: str, module, datamodule, *, world_size: int,
                max_steps: int | None = None, sha256: str | None = None) -> dict:
    """What the run that wrote the checkpoint recorded (its MLflow run id), once the checkpoint is known to fit:
    CheckpointError when it does not open, its adapter does not fit the module (names and shapes), its data
    position does not fit this data and process count, or (`max_steps`, a training run) it is at or past the last
    step. Decrypts the file once for this check and Lightning's load."""
    checkpoint = io.inspect(path, sha256=sha256)
    problem = module.adapter_mismatch(checkpoint)
    position = checkpoint.get(type(datamodule).__qualname__)  # where Lightning keeps the data module's state
    problem = problem or (position and datamodule.resume_problem(position, world_size=world_size))
    if problem:
        raise CheckpointError(f"trainer.resume_from={path}: {problem}")
    step = checkpoint.get("global_step")
    if max_steps is not None and isinstance(step, int) and step >= max_steps:
        raise CheckpointError(f"trainer.resume_from={path} is at step {step}, so trainer.max_steps={max_steps} leaves "
                              f"nothing to train: raise trainer.max_steps above {step}, or evaluate the checkpoint "
                              f"with trainer.validate_only=true")
    return checkpoint.get("medtee", {}).get("run_info", {})


class EncryptedModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writing `step-NNNNNNN.ckpt.enc` (through the trainer's EncryptedCheckpointIO) every
    N optimizer steps, keeping the `keep` most recent (-1: all).

    No monitored metric: with one, Lightning defers the save at an epoch's last batch until a validation that may not
    run then, and that step's checkpoint is never written. Old checkpoints are pruned here instead of by top-k."""

    FILE_EXTENSION = SUFFIX

    def __init__(self, dirpath: Path, *, every_n_steps: int, keep: int) -> None:
        super().__init__(dirpath=str(dirpath), filename="step-{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=-1, monitor=None, save_last=False,
                         save_weights_only=False, enable_version_counter=False)
        self.keep = keep
        self._written: list[str] = []

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written.append(filepath)
        while 0 < self.keep < len(self._written):
            self._remove_checkpoint(trainer, self._written.pop(0))
