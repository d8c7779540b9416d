"""Files the recipe digest names by content and the run opens after the key release (the checkpoint it resumes, the
sealed adapter it evaluates) must be the bytes it hashed: a file replaced on the host in between is refused."""

from __future__ import annotations

import hashlib

import pytest

from medtee import config
from medtee.crypto.stream import StreamError, encrypt
from medtee.training.checkpoint import CheckpointError, EncryptedCheckpointIO
from medtee.training.output import open_sealed_adapter

KEY = bytes(range(32))


def test_a_sealed_adapter_replaced_after_the_digest_is_refused(tmp_path):
    from safetensors.torch import save

    import torch

    path = tmp_path / "adapter.sealed"
    path.write_bytes(encrypt(save({"w": torch.ones(2)}), KEY))
    hashed = hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(open_sealed_adapter(path, KEY, sha256=hashed)["w"], torch.ones(2))
    path.write_bytes(encrypt(save({"w": torch.zeros(2)}), KEY))  # another adapter of the same release
    with pytest.raises(StreamError, match="is not the file the recipe digest covers"):
        open_sealed_adapter(path, KEY, sha256=hashed)


def test_a_checkpoint_replaced_after_the_digest_is_refused(tmp_path):
    io = EncryptedCheckpointIO(KEY)
    path = tmp_path / "step-0000002.ckpt.enc"
    io.save_checkpoint({"global_step": 2}, path)
    hashed = hashlib.sha256(path.read_bytes()).hexdigest()
    assert io.inspect(path, sha256=hashed)["global_step"] == 2
    io.save_checkpoint({"global_step": 4}, path)
    with pytest.raises(CheckpointError, match="is not the file the recipe digest covers: it was replaced"):
        EncryptedCheckpointIO(KEY).inspect(path, sha256=hashed)


def test_only_output_recipient_dev_is_recorded_by_name(tmp_path, monkeypatch):
    """A file named `dev` given as another file setting was recorded as the word, not by its content."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev").write_bytes(b"MEDTEE-CKPT/2\n" + b"\0" * 32)
    recorded = config.digest_input(config.resolved(config.compose(["trainer.resume_from=dev"])))
    assert recorded["trainer"]["resume_from"] == "sha256:" + hashlib.sha256((tmp_path / "dev").read_bytes()).hexdigest()
    assert recorded["output"]["recipient"] == "dev"
