"""The adapter's second copy, `adapter.sealed`: under a key derived from the training dataset's release, so it opens
in a later attested run of that dataset and nowhere else."""

from __future__ import annotations

import pytest
import torch

from medtee.crypto.stream import StreamError, derive_key, encrypt
from medtee.training.output import open_sealed_adapter

DIGEST = "ab" * 32


def _sealed(tmp_path, data_key: bytes):
    from safetensors.torch import save

    path = tmp_path / "adapter.sealed"
    path.write_bytes(encrypt(save({"lora_A": torch.arange(6.0).reshape(2, 3)}), derive_key(data_key, DIGEST, "adapter")))
    return path


def test_opens_with_the_same_release(tmp_path):
    path = _sealed(tmp_path, b"k" * 32)
    tensors = open_sealed_adapter(path, derive_key(b"k" * 32, DIGEST, "adapter"))
    assert torch.equal(tensors["lora_A"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("key", [
    derive_key(b"x" * 32, DIGEST, "adapter"),  # another dataset's release
    derive_key(b"k" * 32, "cd" * 32, "adapter"),  # another manifest
    derive_key(b"k" * 32, DIGEST, "checkpoint"),  # the checkpoint key of the same release
])
def test_no_other_key_opens_it(tmp_path, key):
    with pytest.raises(StreamError):
        open_sealed_adapter(_sealed(tmp_path, b"k" * 32), key)


def test_derivation_purposes_are_a_closed_set():
    assert derive_key(b"k" * 32, DIGEST) == derive_key(b"k" * 32, DIGEST, "checkpoint")  # old checkpoints open
    with pytest.raises(ValueError, match="purpose must be one of"):
        derive_key(b"k" * 32, DIGEST, "anything")
