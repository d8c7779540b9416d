"""Sealed blobs: round trip, context binding, tampering and truncation; blobs written before (golden/) still open."""

from __future__ import annotations

import os

import pytest

from medtee.crypto import hpke
from medtee.crypto.blob import open_blob, seal_blob
from medtee.crypto.hpke import KeyWrapError, Scheme

SCHEMES = list(Scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sealed_blob(scheme):
    priv, pub = hpke.generate_keypair(scheme)
    payload = os.urandom(100_000)
    blob = seal_blob(payload, pub, scheme=scheme, info=b"adapter:run-1")
    assert payload not in blob
    assert open_blob(blob, priv, info=b"adapter:run-1") == payload
    with pytest.raises(KeyWrapError):
        open_blob(blob, priv, info=b"adapter:run-2")
    for pos in (4, 20, len(blob) // 2, len(blob) - 1):  # scheme byte, wrapped key, ciphertext, tag
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(KeyWrapError):
            open_blob(bytes(bad), priv, info=b"adapter:run-1")
    with pytest.raises(KeyWrapError, match="truncated"):
        open_blob(blob[:40], priv, info=b"adapter:run-1")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_blobs_written_before_still_open(golden, golden_private_key, scheme):
    handle = golden_private_key(scheme)
    blob = (golden / {Scheme.hpke_x25519: "x25519.blob", Scheme.hpke_mlkem768_x25519: "hybrid.blob"}[scheme]).read_bytes()
    assert open_blob(blob, handle, info=b"adapter:golden") == b"golden adapter bytes\n" * 100
    with pytest.raises(KeyWrapError):
        open_blob(blob, handle, info=b"adapter:other")
