"""The manifest of a sealed dataset: what it holds, how its key is wrapped, and the data owner's signature over it.

The manifest holds counts and digests only, never record content. Its canonical form is JSON with sorted keys and no
whitespace (bytes as base64); :meth:`Manifest.digest` and the Ed25519 signature both cover that form minus the
signature itself. Format 2 added `token_count` and `tokenizer` (null when not recorded); format-1 manifests (sealed
before) are still read, with both fields None and left out of their canonical form, so their signatures still verify.
`canaries` (the encrypted canary side file of `medtee seal --canaries`, see medtee.audit.canaries) is optional in
format 2: None, it is left out of the canonical form, so manifests sealed before it still verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medtee import files

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_V2_FIELDS = ("token_count", "tokenizer")  # absent from format-1 manifests
_WRAPPING = ("key_id", "scheme", "wrapped_data_key", "owner_public_key")  # what a key rotation may change
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # ~100,000 shards; a larger "manifest" is refused before it is read whole
CIPHER = "AES_GCM_V1"  # fixed: the only Parquet Modular Encryption algorithm that authenticates page data
_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SealedDataError(ValueError):
    """A sealed dataset is malformed, altered or incomplete. The message names the file and the fix, never content."""


def open_regular(path: Path, name: str, fix: str) -> tuple[BinaryIO, int]:
    """`medtee.files.open_regular`, with SealedDataError naming `name`, then `fix`; FileNotFoundError if absent."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        raise
    except files.NotRegularFile as e:
        raise SealedDataError(f"{name} {e}; {fix}") from None
    except OSError as e:
        raise SealedDataError(f"{name} cannot be opened ({e.strerror}); {fix}") from None


def check_dataset_id(dataset_id: str) -> str:
    """Validate a dataset id (it names files in the broker's store); the message never repeats the id."""
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id):
        raise ValueError(
            "dataset id must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return dataset_id


def _canonical(doc: dict) -> bytes:
    """The bytes a manifest's digests and signature cover: sorted keys, no spaces, ASCII."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class ShardInfo:
    """One encrypted Parquet shard."""

    name: str  # file name inside the dataset directory
    sha256: str  # hex digest of the ciphertext file
    rows: int  # records in the shard
    bytes: int  # file size


@dataclass(frozen=True)
class CanaryInfo:
    """The encrypted canary side file (counts only; the canaries themselves are inside it)."""

    name: str  # file name inside the dataset directory
    sha256: str  # hex digest of the ciphertext file
    bytes: int  # file size
    inserted: int  # canaries inserted into the dataset
    controls: int  # canaries of the same space never inserted
    records: int  # synthetic records carrying the inserted canaries (counted in record_count)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to check and open a sealed dataset, except the data key itself."""

    format_version: int  # manifest format (2 when sealed; 1 still read)
    dataset_id: str  # the data owner's name for the dataset; the broker's registration key
    record_count: int  # dialogues in all shards
    message_count: int  # chat turns in all shards
    char_count: int  # characters of turn content
    shards: tuple[ShardInfo, ...]  # in reading order
    key_id: str  # id of the broker public key the data key is wrapped to
    scheme: str  # HPKE scheme of wrapped_data_key (a medtee.crypto.hpke.Scheme value)
    wrapped_data_key: bytes  # the 256-bit data key, HPKE-wrapped to the broker key (info: data_key_info(dataset_id))
    key_check: str  # HMAC-SHA256(data key, dataset id) prefix: tells a wrong key apart from altered data
    release_policy: str  # attestation policy name the broker applies before releasing the key
    classification: str  # data classification label, e.g. "phi"
    dua_id: str  # data-use agreement identifier ("" when none)
    created: str  # ISO-8601 UTC time of sealing
    cipher: str  # Parquet Modular Encryption algorithm (always AES_GCM_V1)
    owner_public_key: bytes  # data owner's Ed25519 public key (raw 32 bytes) that signed this manifest
    token_count: int | None = None  # tokens of the Gemma 3 chat-formatted text under `tokenizer`; None: not recorded
    tokenizer: str | None = None  # "<name> sha256:<fingerprint>" of the tokenizer that counted (sealing.tokens)
    canaries: CanaryInfo | None = None  # the encrypted canary side file; None: no canaries
    signature: bytes = b""  # Ed25519 signature over canonical_body(); empty until signed

    def body(self) -> dict:
        """The signed fields as JSON-ready values (bytes as base64)."""
        doc = asdict(self)
        doc.pop("signature")
        if self.format_version == 1:
            if any(doc[k] is not None for k in _V2_FIELDS):
                raise ValueError("a format-1 manifest cannot record token counts; seal with format 2")
            for k in _V2_FIELDS:
                del doc[k]
        if self.canaries is None:
            del doc["canaries"]
        doc["shards"] = [asdict(s) if not isinstance(s, dict) else s for s in self.shards]
        for k in ("wrapped_data_key", "owner_public_key"):
            doc[k] = base64.b64encode(doc[k]).decode("ascii")
        return doc

    def canonical_body(self) -> bytes:
        """Canonical bytes covered by the digest and the signature."""
        return _canonical(self.body())

    def digest(self) -> str:
        """SHA-256 hex of the canonical manifest (what the broker registers and the release request names)."""
        return hashlib.sha256(self.canonical_body()).hexdigest()

    def content_digest(self) -> str:
        """SHA-256 hex of the canonical manifest without the wrapping of its data key (key_id, scheme,
        wrapped_data_key) and without its signer (owner_public_key): the dataset as `medtee keys rotate`, which
        re-wraps the key and re-signs, leaves it; the rotation signs with the store's owner key, so a dataset a
        trusted-owners/ key sealed comes out signed by another key. The data key (random per seal; `key_check` is in
        the content) is what binds a derived key to one dataset."""
        return hashlib.sha256(_canonical({k: v for k, v in self.body().items() if k not in _WRAPPING})).hexdigest()

    def owner_key_id(self) -> str:
        """Short fingerprint of the signing key (first 16 hex digits of its SHA-256)."""
        return hashlib.sha256(self.owner_public_key).hexdigest()[:16]

    def signed(self, key: Ed25519PrivateKey) -> Manifest:
        """A copy carrying the owner's public key and signature."""
        pub = key.public_key().public_bytes_raw()
        unsigned = replace(self, owner_public_key=pub, signature=b"")
        return replace(unsigned, signature=key.sign(unsigned.canonical_body()))

    def verify_signature(self, *, source: str = "manifest", trusted: Ed25519PublicKey | None = None) -> None:
        """Check the signature (and, if given, that the signer is `trusted`); raise SealedDataError otherwise."""
        if not self.signature:
            raise SealedDataError(f"{source} is not signed; reseal the dataset with `medtee seal`")
        if trusted is not None and trusted.public_bytes_raw() != self.owner_public_key:
            raise SealedDataError(
                f"{source} is signed by key {self.owner_key_id()}, not by the trusted data-owner key; "
                "check that you received the dataset from its owner"
            )
        try:
            Ed25519PublicKey.from_public_bytes(self.owner_public_key).verify(self.signature, self.canonical_body())
        except (InvalidSignature, ValueError):
            raise SealedDataError(f"{source}: signature does not verify; the manifest was altered after sealing") from None

    def to_json(self) -> str:
        """The manifest file's text."""
        doc = self.body()
        doc["signature"] = base64.b64encode(self.signature).decode("ascii")
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> Manifest:
        """Parse a manifest file's text; errors name `source` and the offending field."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise SealedDataError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); restore it from the sealer's output") from None
        except (RecursionError, ValueError):  # nesting deeper than the stack; a number of over 4,300 digits
            raise SealedDataError(f"{source} is not a manifest (nested too deeply or a number too long); restore it "
                                  f"from the sealer's output") from None
        if not isinstance(doc, dict):
            raise SealedDataError(f"{source} must hold a JSON object")
        version = doc.get("format_version")
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            raise SealedDataError(
                f"{source}: format_version {version!r} is not supported (expected one of "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade medtee or reseal"
            )
        names = {f.name for f in fields(cls)} - (set(_V2_FIELDS) if version == 1 else set())
        missing = sorted(names - doc.keys() - {"canaries"})
        if missing:
            raise SealedDataError(f"{source}: missing field(s) {', '.join(missing)}; reseal the dataset")
        unknown = sorted(doc.keys() - names)
        if unknown:
            raise SealedDataError(f"{source}: unknown field(s) {', '.join(unknown)}; the manifest was altered or is from a newer medtee")
        field = ""
        try:
            for field in ("wrapped_data_key", "owner_public_key", "signature"):
                doc[field] = base64.b64decode(doc[field], validate=True)
            field = "shards"  # a list of shard objects
            if not isinstance(doc["shards"], list):
                raise TypeError
            shards = tuple(ShardInfo(**s) for s in doc["shards"])
            field = "canaries"
            if doc.get("canaries") is not None:
                doc["canaries"] = CanaryInfo(**doc["canaries"])
        except (TypeError, ValueError) as e:
            raise SealedDataError(f"{source}: malformed field {field} ({type(e).__name__}); the manifest was "
                                  f"altered") from None
        doc["shards"] = shards
        m = cls(**doc)
        _check_types(m, source)
        return m

    @classmethod
    def load(cls, directory: Path | str) -> Manifest:
        """Read `<directory>/manifest.json`: a regular file of at most MAX_MANIFEST_BYTES, UTF-8 JSON."""
        path = Path(directory) / MANIFEST_NAME
        fix = "restore it from the sealer's output"
        try:
            f, _ = open_regular(path, str(path), fix)
        except FileNotFoundError:
            raise SealedDataError(f"{path} is missing: {directory} is not a sealed dataset (create one with `medtee seal`)") from None
        try:
            with f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise SealedDataError(f"{path} cannot be read ({e.strerror}); {fix}") from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise SealedDataError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB, more than any manifest; {fix}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SealedDataError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
        return cls.from_json(text, source=str(path))


def _check_types(m: Manifest, source: str) -> None:
    for f in fields(Manifest):
        value = getattr(m, f.name)
        expected = {"int": int, "str": str, "bytes": bytes}.get(str(f.type))
        if expected is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise SealedDataError(f"{source}: field {f.name} must be {expected.__name__}")
    if (m.token_count is None) != (m.tokenizer is None):
        raise SealedDataError(f"{source}: token_count and tokenizer must both be set or both be null")
    if m.token_count is not None and (not isinstance(m.token_count, int) or isinstance(m.token_count, bool)
                                      or m.token_count < 0 or not isinstance(m.tokenizer, str)):
        raise SealedDataError(f"{source}: field token_count must be a non-negative int and tokenizer a string")
    for s in m.shards:
        if not (isinstance(s.name, str) and isinstance(s.sha256, str) and isinstance(s.rows, int) and isinstance(s.bytes, int)):
            raise SealedDataError(f"{source}: shard entry {s.name!r} is malformed")
        if "/" in s.name or s.name.startswith(".") or s.name == MANIFEST_NAME:
            raise SealedDataError(f"{source}: shard name {s.name!r} is not a plain file name")
    if m.canaries is not None:
        _check_canaries(m, source)


def _check_canaries(m: Manifest, source: str) -> None:
    c = m.canaries
    if not isinstance(c, CanaryInfo) or not isinstance(c.name, str) or not isinstance(c.sha256, str):
        raise SealedDataError(f"{source}: field canaries is malformed")
    counts = (c.bytes, c.inserted, c.controls, c.records)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
        raise SealedDataError(f"{source}: field canaries: bytes, inserted, controls and records must be non-negative "
                              f"ints")
    if "/" in c.name or c.name.startswith(".") or c.name in {MANIFEST_NAME, *(s.name for s in m.shards)}:
        raise SealedDataError(f"{source}: canary file name {c.name!r} is not a plain file name of its own")


def data_key_info(dataset_id: str) -> bytes:
    """HPKE info binding a wrapped data key to its dataset."""
    return b"medtee/data-key/v1\0" + dataset_id.encode("utf-8")


def key_check(data_key: bytes, dataset_id: str) -> str:
    """Key check value stored in the manifest (reveals nothing about the key)."""
    return hmac.new(data_key, b"medtee/key-check/v1\0" + dataset_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
