"""Sealed blobs: a payload of any size encrypted to an HPKE public key (used for the trained adapter).

Format `MTB1 | scheme byte | u32 wrapped-key length | HPKE-wrapped AES-256 key | 12-byte nonce | AES-256-GCM ct`; the
header (format, scheme, wrapped key) is authenticated together with `info`.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medtee.crypto.hpke import (
    KeyWrapError,
    PrivateKeyHandle,
    Scheme,
    check_handle,
    check_info,
    header_scheme,
    scheme_byte,
    unwrap,
    wrap,
)

_BLOB_MAGIC = b"MTB1"
_KEY_INFO = b"medtee/blob-key/v1\0"


def seal_blob(plaintext: bytes, recipient_public: bytes, *, scheme: Scheme | str, info: bytes) -> bytes:
    """Encrypt `plaintext` with a fresh AES-256-GCM key, that key HPKE-wrapped to `recipient_public`.

    The header (format, scheme, wrapped key) is authenticated together with `info`.
    """
    scheme = Scheme.parse(scheme)
    check_info(info)
    key = AESGCM.generate_key(bit_length=256)
    wrapped = wrap(key, recipient_public, scheme=scheme, info=_KEY_INFO + bytes(info))
    header = _BLOB_MAGIC + scheme_byte(scheme) + struct.pack(">I", len(wrapped)) + wrapped
    nonce = os.urandom(12)
    return header + nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), header + bytes(info))


def open_blob(blob: bytes, private_key: PrivateKeyHandle, *, info: bytes) -> bytes:
    """Decrypt a :func:`seal_blob` result. Raises :class:`KeyWrapError` if anything does not match."""
    check_info(info)
    scheme = header_scheme(blob, _BLOB_MAGIC, "sealed blob")
    check_handle(private_key, scheme)
    if len(blob) < 9:
        raise KeyWrapError("sealed blob is truncated")
    (n,) = struct.unpack(">I", blob[5:9])
    header_end = 9 + n
    if len(blob) < header_end + 12 + 16:
        raise KeyWrapError("sealed blob is truncated")
    key = unwrap(blob[9:header_end], private_key, scheme=scheme, info=_KEY_INFO + bytes(info))
    nonce = blob[header_end:header_end + 12]
    try:
        return AESGCM(key).decrypt(nonce, bytes(blob[header_end + 12:]), bytes(blob[:header_end]) + bytes(info))
    except InvalidTag:
        raise KeyWrapError("sealed blob was altered or the context (info) differs") from None
