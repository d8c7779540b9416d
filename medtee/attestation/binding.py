"""Binding evidence to a key release: REPORT_DATA and the GPU nonce, from one canonical encoding.

Encoding (documented in docs/attestation.md): a domain tag, then each field as
`u32be(len(name)) || name || u32be(len(value)) || value`, in this fixed order:
`nonce`, `ephemeral_public_key`, `recipe_digest` (UTF-8), `receipt_public_key` (the raw 32-byte Ed25519 key that
signs the run's receipt; only when given: without it the encoding is exactly the one before receipts existed), and
(REPORT_DATA only) `gpu_evidence_digests` whose value is `u32be(count)` followed by each digest length-prefixed the
same way.
REPORT_DATA = SHA-384(b"medtee/report-data/v1" || fields) || 16 zero bytes.
GPU nonce   = SHA-256(b"medtee/gpu-nonce/v1" || fields without gpu_evidence_digests).
The GPU nonce cannot cover the GPU evidence (it is part of it); the GPU evidence digests are folded into REPORT_DATA.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

REPORT_DATA_TAG = b"medtee/report-data/v1"
GPU_NONCE_TAG = b"medtee/gpu-nonce/v1"
MIN_NONCE_BYTES = 16
RECEIPT_KEY_BYTES = 32  # a raw Ed25519 public key


def _field(name: str, value: bytes) -> bytes:
    encoded = name.encode("ascii")
    return struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(value)) + value


def _common(nonce: bytes, ephemeral_public_key: bytes, recipe_digest: str, receipt_public_key: bytes | None) -> bytes:
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"binding: nonce must be at least {MIN_NONCE_BYTES} random bytes from the key broker")
    if not isinstance(ephemeral_public_key, (bytes, bytearray)) or not ephemeral_public_key:
        raise ValueError("binding: ephemeral_public_key must be the encoded public key the data key is wrapped to")
    if not isinstance(recipe_digest, str) or not recipe_digest:
        raise ValueError("binding: recipe_digest must be the non-empty digest string of the resolved recipe")
    fields = (
        _field("nonce", bytes(nonce))
        + _field("ephemeral_public_key", bytes(ephemeral_public_key))
        + _field("recipe_digest", recipe_digest.encode("utf-8"))
    )
    if receipt_public_key is None:
        return fields
    if not isinstance(receipt_public_key, (bytes, bytearray)) or len(receipt_public_key) != RECEIPT_KEY_BYTES:
        raise ValueError(f"binding: receipt_public_key must be the raw {RECEIPT_KEY_BYTES}-byte Ed25519 public key "
                         "(ReceiptSigner.public_bytes), or None")
    return fields + _field("receipt_public_key", bytes(receipt_public_key))


def report_data(
    *, nonce: bytes, ephemeral_public_key: bytes, recipe_digest: str, gpu_evidence_digests: Sequence[bytes] = (),
    receipt_public_key: bytes | None = None,
) -> bytes:
    """The 64-byte REPORT_DATA binding nonce, ephemeral key, recipe digest, receipt key (if any) and GPU evidence
    digests."""
    digests = list(gpu_evidence_digests)
    if any(not isinstance(d, (bytes, bytearray)) or not d for d in digests):
        raise ValueError("binding: every gpu_evidence_digest must be non-empty bytes (GpuEvidence.digest())")
    gpu = struct.pack(">I", len(digests)) + b"".join(struct.pack(">I", len(d)) + bytes(d) for d in digests)
    common = _common(nonce, ephemeral_public_key, recipe_digest, receipt_public_key)
    material = REPORT_DATA_TAG + common + _field("gpu_evidence_digests", gpu)
    return hashlib.sha384(material).digest() + bytes(16)


def gpu_nonce(*, nonce: bytes, ephemeral_public_key: bytes, recipe_digest: str,
              receipt_public_key: bytes | None = None) -> bytes:
    """The 32-byte nonce given to each GPU's SPDM GET_MEASUREMENTS, derived from the same material."""
    common = _common(nonce, ephemeral_public_key, recipe_digest, receipt_public_key)
    return hashlib.sha256(GPU_NONCE_TAG + common).digest()
