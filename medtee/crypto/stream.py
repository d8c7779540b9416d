"""The checkpoint stream cipher: keys per sealed dataset, derived from its released data key (for checkpoints and for
the adapter sealed to the release), and a versioned, authenticated, segmented file format.

Format 2 (written): `MEDTEE-CKPT/2\\n`, then one Cobblestone-256 ciphertext (`cryptography.cobblestone`, the C2SP
chunked-encryption construction: a random per-file nonce and a key commitment, per-file keys derived with SHA-512,
AES-256-GCM over 16 KiB chunks, the last chunk marked) under the context `medtee/checkpoint/v2`. A wrong key,
truncation, reordering, splicing and any altered byte are detected.

Format 1 (read, no longer written): `MEDTEE-CKPT/1\\n`, an 8-byte nonce prefix, then segments of (4-byte big-endian
length, AES-256-GCM ciphertext) of at most 64 MiB of plaintext each; segment i uses nonce prefix || i and
authenticates the magic, the prefix, i and whether it is the last segment.

A file whose header names another format version is refused by name (written by a newer medtee), never guessed at.
"""

from __future__ import annotations

import struct
from typing import Sequence

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_MAGIC_PREFIX = b"MEDTEE-CKPT/"
MAGIC = _MAGIC_PREFIX + b"2\n"  # the format encrypt() writes
MAGIC_V1 = _MAGIC_PREFIX + b"1\n"
_CONTEXT = b"medtee/checkpoint/v2"
_V1_NONCE_PREFIX = 8


class StreamError(ValueError):
    """An encrypted checkpoint cannot be read: the message names the file and the likely cause, never its contents."""


#: What a key derived from a dataset's data key may be for: encrypted checkpoints, and the adapter sealed to the
#: data owner's release (`adapter.sealed`: opened only by a run the broker releases this dataset's key to).
PURPOSES = ("checkpoint", "adapter")


def derive_key(data_key: bytes, dataset_digest: str, purpose: str = "checkpoint") -> bytes:
    """A key of one sealed dataset for `purpose`: HKDF-SHA256(data key, info = medtee/PURPOSE/v1/ + `dataset_digest`),
    the manifest's `content_digest()` (runs before 2026-12 took its `digest()`, which a key rotation changes).

    The checkpoint key opens both formats (the `v1` in the label names the derivation, not the file format)."""
    if purpose not in PURPOSES:
        raise ValueError(f"derive_key: purpose must be one of {', '.join(PURPOSES)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"medtee/{purpose}/v1/".encode() + dataset_digest.encode()).derive(data_key)


def encrypt(plaintext: bytes | memoryview, key: bytes) -> bytes:
    """`plaintext` encrypted under `key` in the current format (2)."""
    encryptor = Cobblestone256Encryptor(key, _CONTEXT)
    return b"".join((MAGIC, encryptor.update(plaintext), encryptor.finalize()))


def header_problem(path) -> str | None:
    """Why the regular file at `path` is not an encrypted file this medtee reads (a checkpoint, a sealed adapter),
    from its first bytes only (no key needed), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC_PREFIX) + 8)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if head.startswith((MAGIC, MAGIC_V1)):
        return None
    if head.startswith(_MAGIC_PREFIX):
        version = head[len(_MAGIC_PREFIX):].split(b"\n")[0].decode("ascii", "replace")
        return f"is a medtee encrypted file of format {version!r}, which this medtee does not read (it reads 1 and 2)"
    return f"is not a medtee encrypted file (no {_MAGIC_PREFIX.decode()}N header)"


def decrypt(blob: bytes, key: bytes, *, name: str, earlier: Sequence[bytes] = ()) -> bytes:
    """The plaintext of a format-1 or format-2 `blob`, once all of it is authenticated, under `key` or one of the
    `earlier` keys (those of an earlier derivation the file may have been written under); `name` (the file) is what
    errors mention."""
    if blob.startswith(MAGIC):
        opener = _decrypt_v2
    elif blob.startswith(MAGIC_V1):
        opener = _decrypt_v1
    elif blob.startswith(_MAGIC_PREFIX):
        version = bytes(blob[len(_MAGIC_PREFIX):len(_MAGIC_PREFIX) + 8]).split(b"\n")[0].decode("ascii", "replace")
        raise StreamError(f"{name} is a medtee encrypted checkpoint of format {version!r}, which this medtee does not "
                          "read (it reads formats 1 and 2); open it with the medtee version that wrote it")
    else:
        raise StreamError(f"{name} is not a medtee encrypted checkpoint (no {_MAGIC_PREFIX.decode()}N header)")
    for candidate in (key, *earlier):
        try:
            return opener(memoryview(blob), candidate)
        except (InvalidTag, struct.error):
            continue
    raise StreamError(f"{name} cannot be decrypted with this run's key: it was written by a run on another sealed "
                      "dataset, or by a medtee before 2026-12 before `medtee keys rotate` of this dataset (its key "
                      "derived from the manifest digest, which the rotation changed), or it is truncated or altered. "
                      "Resume with the dataset (and attestation policy) of the run that wrote it")


def _decrypt_v2(view: memoryview, key: bytes) -> bytes:
    decryptor = Cobblestone256Decryptor(key, _CONTEXT)
    return b"".join((decryptor.update(view[len(MAGIC):]), decryptor.finalize()))


def _v1_aad(prefix: bytes, index: int, last: bool) -> bytes:
    return MAGIC_V1 + prefix + struct.pack(">I?", index, last)


def _decrypt_v1(view: memoryview, key: bytes) -> bytes:
    aead, start = AESGCM(key), len(MAGIC_V1) + _V1_NONCE_PREFIX
    prefix, pos, i, out = bytes(view[len(MAGIC_V1):start]), start, 0, []
    while pos < len(view):
        (length,) = struct.unpack(">I", view[pos:pos + 4])
        end = pos + 4 + length
        if end > len(view):
            raise InvalidTag
        out.append(aead.decrypt(prefix + struct.pack(">I", i), bytes(view[pos + 4:end]),
                                _v1_aad(prefix, i, end == len(view))))
        pos, i = end, i + 1
    if i == 0:
        raise InvalidTag
    return b"".join(out)
