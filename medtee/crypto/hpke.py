"""HPKE (RFC 9180, base mode): schemes, in-memory private key handles, key files, wrapping a secret to a public key.

Two schemes: classical X25519 and hybrid post-quantum ML-KEM-768 + X25519 (the default: a recorded ciphertext stays
safe against a future quantum computer unless both KEMs break). KDF HKDF-SHA256, AEAD AES-256-GCM in both.
Private keys live in :class:`PrivateKeyHandle` objects that refuse to be printed or pickled; the only way a private
key reaches disk is :func:`write_keypair` (file mode 0600). Sealed blobs built on this are `medtee.crypto.blob`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from medtee.files import NotRegularFile, read_regular, write_new

_KEY_FILE_FORMAT = "medtee-hpke-key/1"
MAX_KEY_FILE_BYTES = 64 * 1024  # a hybrid private key file is about 3 KiB; a larger "key" is refused unread
_WRAP_MAGIC = b"MTW1"  # wrapped secret: magic, scheme byte, HPKE enc || ciphertext
_X25519_LEN = 32
_MLKEM768_PUB_LEN = 1184


class KeyWrapError(ValueError):
    """A wrapped key or sealed blob cannot be opened (wrong key, wrong context, wrong scheme or altered bytes)."""


class Scheme(str, Enum):
    """HPKE key-encapsulation scheme used to wrap data keys and sealed blobs."""

    hpke_x25519 = "hpke-x25519"  # classical HPKE X25519
    hpke_mlkem768_x25519 = "hpke-mlkem768-x25519"  # hybrid post-quantum ML-KEM-768 + X25519 (the default)

    @property
    def public_length(self) -> int:
        """Length in bytes of a raw public key of this scheme."""
        return _X25519_LEN if self is Scheme.hpke_x25519 else _MLKEM768_PUB_LEN + _X25519_LEN

    @classmethod
    def parse(cls, value: str | Scheme) -> Scheme:
        """The scheme named `value`; a clear error lists the valid names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown key-wrapping scheme {value!r}; use one of: {names}") from None

    @classmethod
    def for_public_key(cls, public: bytes) -> Scheme:
        """The scheme a raw public key belongs to, from its length (the two lengths differ)."""
        for scheme in cls:
            if len(public) == scheme.public_length:
                return scheme
        raise KeyWrapError(f"a public key of {len(public)} bytes matches no scheme (X25519: 32, hybrid: 1216)")


DEFAULT_SCHEME = Scheme.hpke_mlkem768_x25519
_SCHEME_BYTE = {Scheme.hpke_x25519: 1, Scheme.hpke_mlkem768_x25519: 2}
_SCHEME_FROM_BYTE = {v: k for k, v in _SCHEME_BYTE.items()}


def _suite(scheme: Scheme) -> hpke.Suite:
    kem = hpke.KEM.X25519 if scheme is Scheme.hpke_x25519 else hpke.KEM.MLKEM768_X25519
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def key_id(scheme: Scheme, public: bytes) -> str:
    """A short stable identifier of a public key (first 16 hex digits of SHA-256 over scheme and key)."""
    return hashlib.sha256(Scheme(scheme).value.encode() + b"\0" + public).hexdigest()[:16]


class PrivateKeyHandle:
    """An HPKE private key in memory. Not printable, not picklable, no export method."""

    __slots__ = ("scheme", "public_bytes", "_key")

    def __init__(self, scheme: Scheme, key: object, public_bytes: bytes) -> None:
        self.scheme = Scheme(scheme)
        self.public_bytes = public_bytes
        self._key = key

    @property
    def key_id(self) -> str:
        """Identifier of the matching public key."""
        return key_id(self.scheme, self.public_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scheme={self.scheme.value}, key_id={self.key_id})"

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} holds a private key and cannot be pickled or copied out of memory")


def _generate_parts(scheme: Scheme) -> tuple[x25519.X25519PrivateKey, mlkem.MLKEM768PrivateKey | None]:
    return x25519.X25519PrivateKey.generate(), (mlkem.MLKEM768PrivateKey.generate() if scheme is Scheme.hpke_mlkem768_x25519 else None)


def _handle_from_parts(scheme: Scheme, x: x25519.X25519PrivateKey, m: mlkem.MLKEM768PrivateKey | None) -> PrivateKeyHandle:
    x_pub = x.public_key().public_bytes_raw()
    if scheme is Scheme.hpke_x25519:
        return PrivateKeyHandle(scheme, x, x_pub)
    assert m is not None
    return PrivateKeyHandle(scheme, hpke.MLKEM768X25519PrivateKey(m, x), m.public_key().public_bytes_raw() + x_pub)


def _public_object(scheme: Scheme, public: bytes):
    if len(public) != scheme.public_length:
        raise KeyWrapError(f"{scheme.value} public key must be {scheme.public_length} bytes, got {len(public)}")
    if scheme is Scheme.hpke_x25519:
        return x25519.X25519PublicKey.from_public_bytes(public)
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(public[:_MLKEM768_PUB_LEN]),
        x25519.X25519PublicKey.from_public_bytes(public[_MLKEM768_PUB_LEN:]),
    )


def generate_keypair(scheme: Scheme | str = DEFAULT_SCHEME) -> tuple[PrivateKeyHandle, bytes]:
    """A fresh key pair: the in-memory private handle and the raw public bytes."""
    scheme = Scheme.parse(scheme)
    handle = _handle_from_parts(scheme, *_generate_parts(scheme))
    return handle, handle.public_bytes


def scheme_byte(scheme: Scheme) -> bytes:
    """The one byte that names `scheme` in the headers of medtee's formats (wrapped keys, sealed blobs)."""
    return bytes([_SCHEME_BYTE[Scheme(scheme)]])


def check_info(info: bytes) -> None:
    """Refuse an empty or non-bytes `info` (every wrapped secret names what it is for)."""
    if not isinstance(info, (bytes, bytearray)) or not info:
        raise ValueError("info must be non-empty bytes naming what the key is for (domain separation)")


def wrap(secret: bytes, recipient_public: bytes, *, scheme: Scheme | str, info: bytes) -> bytes:
    """Encrypt `secret` (a key) to `recipient_public`; `info` binds the context and must match on unwrap."""
    scheme = Scheme.parse(scheme)
    check_info(info)
    ct = _suite(scheme).encrypt(bytes(secret), _public_object(scheme, bytes(recipient_public)), info=bytes(info))
    return _WRAP_MAGIC + scheme_byte(scheme) + ct


def header_scheme(blob: bytes, magic: bytes, what: str) -> Scheme:
    """The scheme named by the header `magic || scheme byte` of `blob`; KeyWrapError if the header is not that."""
    if len(blob) < 5 or blob[:4] != magic or blob[4] not in _SCHEME_FROM_BYTE:
        raise KeyWrapError(f"not a medtee {what} (bad header); was it produced by medtee with this format version?")
    return _SCHEME_FROM_BYTE[blob[4]]


def check_handle(private_key: PrivateKeyHandle, scheme: Scheme) -> None:
    """Refuse anything but a PrivateKeyHandle of `scheme`."""
    if not isinstance(private_key, PrivateKeyHandle):
        raise TypeError("private_key must be a PrivateKeyHandle (see load_private_key / generate_keypair)")
    if private_key.scheme is not scheme:
        raise KeyWrapError(
            f"this was wrapped with {scheme.value} but the private key is {private_key.scheme.value}; use the matching key"
        )


def unwrap(blob: bytes, private_key: PrivateKeyHandle, *, scheme: Scheme | str, info: bytes) -> bytes:
    """Open a :func:`wrap` result. Raises :class:`KeyWrapError` on a wrong key, wrong info or altered blob."""
    scheme = Scheme.parse(scheme)
    check_info(info)
    found = header_scheme(blob, _WRAP_MAGIC, "wrapped key")
    if found is not scheme:
        raise KeyWrapError(f"wrapped key uses {found.value}, expected {scheme.value}")
    check_handle(private_key, scheme)
    try:
        return _suite(scheme).decrypt(bytes(blob[5:]), private_key._key, info=bytes(info))
    except (InvalidTag, ValueError):
        raise KeyWrapError(
            f"cannot unwrap (key {private_key.key_id}): wrong private key, wrong context, or the wrapped key was altered"
        ) from None


class EphemeralKey:
    """A key pair that exists only in this process's memory (the TEE's key for receiving a data key)."""

    __slots__ = ("_handle",)

    def __init__(self, handle: PrivateKeyHandle) -> None:
        self._handle = handle

    @classmethod
    def generate(cls, scheme: Scheme | str = DEFAULT_SCHEME) -> EphemeralKey:
        """A fresh ephemeral key pair."""
        return cls(generate_keypair(scheme)[0])

    @property
    def scheme(self) -> Scheme:
        """The HPKE scheme of this key."""
        return self._handle.scheme

    @property
    def public_bytes(self) -> bytes:
        """Raw public key bytes (what gets bound into the attestation report)."""
        return self._handle.public_bytes

    def unwrap(self, blob: bytes, *, info: bytes) -> bytes:
        """Open a secret wrapped to this key."""
        return unwrap(blob, self._handle, scheme=self.scheme, info=info)

    def __repr__(self) -> str:
        return f"EphemeralKey(scheme={self.scheme.value}, key_id={self._handle.key_id})"

    def __reduce__(self):
        raise TypeError("EphemeralKey lives only in memory and cannot be pickled")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_keypair(directory: Path | str, name: str, scheme: Scheme | str = DEFAULT_SCHEME) -> Path:
    """Create `<name>.key` (private, mode 0600) and `<name>.pub` in `directory`; returns the public key's path.

    Refuses to overwrite an existing key of that name, even one another process creates meanwhile.
    """
    scheme = Scheme.parse(scheme)
    directory = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name (no '/', not starting with '.')")
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    def exists(p: Path) -> FileExistsError:
        return FileExistsError(f"{p} already exists; choose another --name or directory (keys are never overwritten)")

    for p in (private_path, public_path):
        if p.exists():
            raise exists(p)
    directory.mkdir(parents=True, exist_ok=True)
    x, m = _generate_parts(scheme)
    handle = _handle_from_parts(scheme, x, m)
    private = {"format": _KEY_FILE_FORMAT, "kind": "private", "scheme": scheme.value, "x25519": _b64(x.private_bytes_raw())}
    if m is not None:
        private["mlkem768_seed"] = _b64(m.private_bytes_raw())
    public = {"format": _KEY_FILE_FORMAT, "kind": "public", "scheme": scheme.value, "key_id": handle.key_id,
              "public": _b64(handle.public_bytes)}
    for path, doc, mode in ((private_path, json.dumps(private), 0o600), (public_path, json.dumps(public, indent=1), 0o644)):
        try:
            write_new(path, doc.encode() + b"\n", mode=mode)
        except FileExistsError:
            raise exists(path) from None
    return public_path


def _key_file_bytes(path: Path | str) -> bytes:
    try:
        return read_regular(Path(path), MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} does not exist; create one with `medtee keys new`") from None
    except NotRegularFile as e:
        raise KeyWrapError(f"key file {path} {e}") from None


def _read_key_file(path: Path | str, kind: str) -> dict:
    return _parse_key_file(_key_file_bytes(path), Path(path), kind)


def _parse_key_file(data: bytes, path: Path, kind: str) -> dict:
    try:
        doc = json.loads(data)
        ok = isinstance(doc, dict) and doc.get("format") == _KEY_FILE_FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise KeyWrapError(f"{path} is not a medtee key file ({_KEY_FILE_FORMAT}); create one with `medtee keys new`")
    if doc.get("kind") != kind:
        raise KeyWrapError(f"{path} holds a {doc.get('kind')} key, expected a {kind} key")
    try:
        doc["scheme"] = Scheme.parse(doc.get("scheme", ""))
    except ValueError as e:
        raise KeyWrapError(f"{path}: {e}") from None
    return doc


@dataclass(frozen=True)
class PublicKeyFile:
    """A recipient's `.pub` file read once: what outputs are encrypted to, and the bytes a recipe digest hashes (so a
    file replaced after the digest changes nothing)."""

    path: str
    scheme: Scheme
    public: bytes
    data: bytes


def read_public_key_file(path: Path | str) -> PublicKeyFile:
    """Read and parse a `.pub` file once (as :func:`load_public_key`), keeping its bytes."""
    data = _key_file_bytes(path)
    scheme, public = _public_of(_parse_key_file(data, Path(path), "public"), path)
    return PublicKeyFile(path=str(path), scheme=scheme, public=public, data=data)


def load_public_key(path: Path | str) -> tuple[Scheme, bytes]:
    """Read a `.pub` file written by :func:`write_keypair`."""
    return _public_of(_read_key_file(path, "public"), path)


def _public_of(doc: dict, path: Path | str) -> tuple[Scheme, bytes]:
    try:
        public = base64.b64decode(doc["public"], validate=True)
        _public_object(doc["scheme"], public)
    except (KeyError, ValueError) as e:
        raise KeyWrapError(f"{path}: malformed public key ({type(e).__name__}); recreate it with `medtee keys new`") from None
    return doc["scheme"], public


def load_private_key(path: Path | str) -> tuple[Scheme, PrivateKeyHandle]:
    """Read a `.key` file written by :func:`write_keypair`; refuses a file readable by group or others."""
    path = Path(path)
    doc = _read_key_file(path, "private")
    if os.stat(path).st_mode & 0o077:
        raise PermissionError(f"private key {path} is accessible by group/others; run `chmod 600 {path}`")
    scheme = doc["scheme"]
    try:
        x = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(doc["x25519"], validate=True))
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(base64.b64decode(doc["mlkem768_seed"], validate=True)) \
            if scheme is Scheme.hpke_mlkem768_x25519 else None
    except (KeyError, ValueError):
        raise KeyWrapError(f"{path}: malformed private key; it cannot be repaired, restore it from backup") from None
    return scheme, _handle_from_parts(scheme, x, m)
