"""Encrypted training checkpoints: Lightning's checkpoint dict, serialized in memory, AES-256-GCM, written atomically.

The key is derived (HKDF-SHA256) from the released data key and the sealed dataset's manifest digest, so only a run
whose attestation released that dataset's key again can read a checkpoint back (resuming means attesting again).
A checkpoint holds the LoRA parameters, optimizer, scheduler, loop and data-loader positions, RNG states and the
MLflow run id (see `training.module.CausalLMModule`); never the frozen base weights and never plaintext on disk.

File format: MAGIC, 8-byte nonce prefix, then segments of (4-byte big-endian length, AES-GCM ciphertext) each at
most SEGMENT bytes of plaintext; segment i uses nonce prefix || i and authenticates MAGIC, the prefix, i and whether
it is the last segment, so truncation, reordering and splicing are all detected.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from medtee.files import write_atomic

MAGIC = b"MEDTEE-CKPT/1\n"
SEGMENT = 1 << 26  # 64 MiB of plaintext per AES-GCM segment (cryptography's AES-GCM takes < 2 GiB at once)
SUFFIX = ".ckpt.enc"


class CheckpointError(ValueError):
    """A checkpoint cannot be read back: the message names the file and the likely cause, never its contents."""


def derive_key(data_key: bytes, manifest_digest: str) -> bytes:
    """The checkpoint key of one sealed dataset: HKDF-SHA256(data key, info = purpose + manifest digest)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"medtee/checkpoint/v1/" + manifest_digest.encode()).derive(data_key)


def _aad(prefix: bytes, index: int, last: bool) -> bytes:
    return MAGIC + prefix + struct.pack(">I?", index, last)


def encrypt(plaintext: bytes, key: bytes) -> bytes:
    aead, prefix = AESGCM(key), os.urandom(8)
    out = [MAGIC, prefix]
    n = max(1, -(-len(plaintext) // SEGMENT))
    for i in range(n):
        piece = plaintext[i * SEGMENT:(i + 1) * SEGMENT]
        sealed = aead.encrypt(prefix + struct.pack(">I", i), piece, _aad(prefix, i, i == n - 1))
        out += [struct.pack(">I", len(sealed)), sealed]
    return b"".join(out)


def decrypt(blob: bytes, key: bytes, *, name: str) -> bytes:
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{name} is not a medtee encrypted checkpoint (no {MAGIC.strip().decode()} header)")
    aead, view = AESGCM(key), memoryview(blob)
    prefix, pos, i, out = bytes(view[len(MAGIC):len(MAGIC) + 8]), len(MAGIC) + 8, 0, []
    try:
        while pos < len(blob):
            (length,) = struct.unpack(">I", view[pos:pos + 4])
            end = pos + 4 + length
            if end > len(blob):
                raise InvalidTag
            out.append(aead.decrypt(prefix + struct.pack(">I", i), bytes(view[pos + 4:end]),
                                    _aad(prefix, i, end == len(blob))))
            pos, i = end, i + 1
        if i == 0:
            raise InvalidTag
    except (InvalidTag, struct.error):
        raise CheckpointError(f"{name} cannot be decrypted with this run's key: it was written by a run on another "
                              "sealed dataset, or it is truncated or altered. Resume with the dataset (and "
                              "attestation policy) of the run that wrote it") from None
    return b"".join(out)


class EncryptedCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO: torch.save into memory, encrypt, write atomically; the reverse on load."""

    def __init__(self, key: bytes):
        self._key = key

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, encrypt(buffer.getbuffer().tobytes(), self._key))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        import torch

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"trainer.resume_from={path}: no such checkpoint file")
        plaintext = decrypt(path.read_bytes(), self._key, name=str(path))
        # Authenticated above with a key only this attested run holds: the pickled RNG states are trusted.
        return torch.load(io.BytesIO(plaintext), map_location=map_location or "cpu", weights_only=False)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


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
