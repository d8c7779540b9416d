"""The key-release protocol: the KeyBroker contract, request validation, and the TEE's client half.

Challenge-response, as in Confidential Containers' KBS: the TEE asks for a nonce for a dataset, makes an ephemeral
key pair in encrypted memory, collects evidence whose REPORT_DATA binds nonce, ephemeral public key, recipe digest,
optionally the receipt public key (the Ed25519 key that will sign the run's receipt) and GPU evidence digests
(`medtee.attestation.report_data`), and asks for release. The broker consumes the nonce (single use, expiring),
checks the manifest digest against the registered one, appraises the evidence with the dataset's current policy,
and answers with the data key HPKE-wrapped to the ephemeral key (info `release_info`) and a :class:`ReleaseRecord`
(the release's id and the hash of its audit entry), or a denial listing the failed checks. When the run has torn
down, it closes the release (`close_release`) with a teardown record, of which the broker audits only a digest.
Every decision is appended to the broker's hash-chained audit log.

Other key managers (a cloud KMS, HashiCorp Vault, a Confidential Containers key broker) can stand behind the same
:class:`KeyBroker` contract: they hold the broker private key (or the data keys), keep registrations, and must
perform the same release checks before returning `wrap(data_key, ephemeral_public_key, info=release_info(...))`.

Request validation (`parse_json`, `parse_challenge_request`, `parse_release_request`) is what the HTTP service
applies to every body: bounded JSON nesting and size, exact field sets, digests as 64 lowercase hex characters,
dataset ids by `check_dataset_id`, base64 with bounded decoded size. Error messages name the field and the rule,
never the value, so they can be logged and returned as they are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from medtee.crypto.hpke import DEFAULT_SCHEME, EphemeralKey, Scheme
from medtee.crypto.secret import SecretBuffer
from medtee.sealing.manifest import Manifest, check_dataset_id

if TYPE_CHECKING:
    from medtee.attestation.evidence import Evidence, GpuEvidence
    from medtee.attestation.verdict import Verdict

NONCE_BYTES = 32  # what this broker issues
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 16, 64  # what a release request or a challenge answer may carry
DEFAULT_NONCE_TTL_S = 120.0
MAX_JSON_DEPTH = 16  # nesting levels of a request or answer body
MAX_JSON_SKELETON = 256 << 10  # bytes of a JSON body outside its strings (bounds the number of values)
MAX_JSON_ESCAPES = 64 << 10  # backslash escapes in a JSON body (medtee's bodies hold a few hundred)
MAX_PUBLIC_KEY_BYTES = 4096
MAX_REPORT_BYTES = 4096  # an SEV-SNP report is 1184 bytes
MAX_CERTIFICATES, MAX_CERTIFICATE_BYTES = 8, 16 << 10  # per chain, per DER certificate
MAX_GPUS, MAX_GPU_REPORT_BYTES = 8, 64 << 10  # per evidence, per SPDM request||response
RECEIPT_KEY_BYTES = 32  # a raw Ed25519 public key (medtee.attestation.binding.RECEIPT_KEY_BYTES)
MAX_CLOSE_RECORD_BYTES = 16 << 10  # canonical JSON of a teardown record
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PROVIDER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')
_BRACKET = re.compile(r"[\[\]{}]")


class KeyReleaseDenied(Exception):
    """The broker refused to release a key; `verdict` holds every check, the message lists the failed ones."""

    def __init__(self, verdict: Verdict, dataset_id: str = "") -> None:
        self.verdict = verdict
        self.dataset_id = dataset_id
        super().__init__(f"key release for dataset '{dataset_id}' denied:\n{verdict.explain()}")


class UnknownDatasetError(LookupError):
    """The broker has no registration for this dataset id. `public`: the message for a remote client (the store's
    path on the broker's host left out)."""

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message


class ChallengeRefused(RuntimeError):
    """Too many outstanding challenges for the dataset or the client (HTTP 429); retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CloseNotAuthorized(PermissionError):
    """A close request refused before the broker says anything about the release (HTTP 403): the same message,
    `CLOSE_REFUSED`, whether the id names no release, a release without receipt key, or the key or signature is not
    the release's."""


class ReleaseClosedError(RuntimeError):
    """The release was closed already with another record (HTTP 409); told only to its receipt key's holder."""


class RequestError(ValueError):
    """A malformed request (HTTP 400). `fields` holds the request's fields that did validate, parsed."""

    def __init__(self, message: str, fields: dict | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}


#: Where a broker keeps its keys, registrations and audit log unless told otherwise (`--broker-dir`,
#: `broker.dir`), relative to the current directory.
DEFAULT_BROKER_DIR = ".medtee/broker"


def is_loopback_url(url: str) -> bool:
    """Whether an http(s) URL names this machine (localhost or a loopback address): the only place plain http may
    reach a broker."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def release_info(dataset_id: str, nonce: bytes) -> bytes:
    """HPKE info of a released data key: binds it to the dataset and the challenge it answers."""
    return b"medtee/release/v1\0" + dataset_id.encode("utf-8") + b"\0" + bytes(nonce)


@dataclass(frozen=True)
class ReleaseRecord:
    """The broker's record of one release: its id (what `close_release` names) and the SHA-256 hex of its audit-log
    entry (the entry's `hash`), for the run's receipt."""

    release_id: str
    audit_entry_sha256: str


@dataclass(frozen=True)
class Release:
    """What `obtain_data_key` returns: the data key (wipe it when done) and what a receipt records of the release."""

    data_key: SecretBuffer = field(repr=False)
    release_id: str
    audit_entry_sha256: str
    nonce: bytes
    ephemeral_public_key: bytes


def canonical_json(doc: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN (as `config.recipe_digest` hashes a recipe); TypeError/ValueError
    for what JSON cannot hold."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_digest(record: dict) -> str:
    """SHA-256 hex of a teardown record's canonical JSON: what the broker audits of it, and what an auditor compares
    with the record in the receipt."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


@runtime_checkable
class KeyBroker(Protocol):
    """What sealing and the TEE's key-release step need from a key broker (embedded, HTTP, or another KMS)."""

    def public_key(self) -> tuple[Scheme, bytes]:
        """Scheme and raw public key that data keys are wrapped to."""

    def register(self, manifest: Manifest) -> None:
        """Accept a signed manifest (the dataset id, digest, wrapped key and release policy)."""

    def challenge(self, dataset_id: str) -> bytes:
        """A fresh single-use nonce for a release of `dataset_id`; it expires."""

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str, receipt_public_key: bytes | None = None,
                recipe: dict | None = None) -> tuple[bytes, ReleaseRecord]:
        """The data key wrapped to `ephemeral_public_key` (info `release_info`) and the release's record, or
        KeyReleaseDenied. The expected REPORT_DATA covers `receipt_public_key` when one is given; `recipe` is what
        `recipe_digest` covers (`config.digest_input`), for the release policy's recipe rules."""

    def close_release(self, release_id: str, *, record: dict, receipt_public_key: bytes, signature: bytes) -> str:
        """Record the end of a release with the run's teardown record (only its digest is kept); the close entry's
        hash. The request is signed (`signature` over `close_message`) by the receipt key the release bound: only
        the attested process closes its release. CloseNotAuthorized, the same for every cause, unless that
        signature verifies; then a repeat with the same record returns the existing close entry's hash and one
        with another record is ReleaseClosedError."""


# -- validation ------------------------------------------------------------------------------------------------------
def _outside_strings(text: str) -> list[tuple[int, int]]:
    """The (start, end) spans of `text` outside JSON string literals, in one linear pass over its quotes and
    backslashes (a regex over the strings would be quadratic on an unterminated one)."""
    spans, start, in_string, skip = [], 0, False, -1
    for match in _QUOTE_OR_ESCAPE.finditer(text):
        i = match.start()
        if i < skip:
            continue
        if in_string and match.group() == "\\":
            skip = i + 2  # the escaped character
        elif match.group() == '"':
            if in_string:
                start = i + 1
            else:
                spans.append((start, i))
            in_string = not in_string
    if not in_string:
        spans.append((start, len(text)))
    return spans


def parse_json(body: bytes | bytearray, what: str = "body") -> object:
    """A JSON document nested at most MAX_JSON_DEPTH deep with at most MAX_JSON_SKELETON bytes outside its strings and
    MAX_JSON_ESCAPES escapes (so parsing it needs bounded time and memory and no recursion), or RequestError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{what} is not UTF-8") from None
    # counted at C speed first, so the scan below walks a bounded number of quotes and escapes (a 4 MiB body of
    # quotes used to take seconds): valid JSON separates its strings by at least one byte outside them
    escapes = text.count("\\")
    if escapes > MAX_JSON_ESCAPES:
        raise RequestError(f"{what} holds more than {MAX_JSON_ESCAPES} backslash escapes")
    if text.count('"') - escapes > 2 * (MAX_JSON_SKELETON + 1):
        raise RequestError(f"{what} holds too many JSON values (over {MAX_JSON_SKELETON + 1} strings)")
    gaps = _outside_strings(text)
    if sum(end - start for start, end in gaps) > MAX_JSON_SKELETON:
        raise RequestError(f"{what} holds too many JSON values (over {MAX_JSON_SKELETON} bytes outside strings)")
    depth = 0
    for start, end in gaps:
        for bracket in _BRACKET.finditer(text, start, end):
            depth += 1 if bracket.group() in "[{" else -1
            if depth > MAX_JSON_DEPTH:
                raise RequestError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError(f"{what} is not valid JSON") from None


def check_digest(value: object, where: str) -> str:
    """`value` if it is a SHA-256 digest as exactly 64 lowercase hex characters, else RequestError naming `where`."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise RequestError(f"{where} must be 64 lowercase hex characters")
    return value


def decode_b64(value: object, where: str, max_bytes: int, min_bytes: int = 1) -> bytes:
    """Strict base64 of `min_bytes`..`max_bytes` bytes, decoded; RequestError naming `where` otherwise."""
    rule = f"{where} must be base64 of {min_bytes} to {max_bytes} bytes"
    if not isinstance(value, str) or len(value) > 4 * -(-max_bytes // 3):
        raise RequestError(rule)
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise RequestError(rule) from None
    if not min_bytes <= len(raw) <= max_bytes:
        raise RequestError(rule)
    return raw


def _object(doc: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(doc, dict):
        raise RequestError(f"{where} must be a JSON object")
    missing = [k for k in required if k not in doc]
    if missing:
        raise RequestError(f"{where}: missing field(s) {', '.join(missing)}")
    if not doc.keys() <= {*required, *optional}:
        raise RequestError(f"{where}: unknown field(s); allowed: {', '.join((*required, *optional))}")
    return doc


def _items(value: object, where: str, max_items: int) -> list:
    if not isinstance(value, list) or len(value) > max_items:
        raise RequestError(f"{where} must be a list of at most {max_items} items")
    return value


def _dataset_id(value: object) -> str:
    try:
        return check_dataset_id(value)
    except ValueError as e:
        raise RequestError(f"dataset_id: {e}") from None


def _certificates(value: object, where: str) -> tuple[bytes, ...]:
    return tuple(decode_b64(c, f"{where}[{i}]", MAX_CERTIFICATE_BYTES)
                 for i, c in enumerate(_items(value, where, MAX_CERTIFICATES)))


def _gpu(doc: object, where: str) -> GpuEvidence:
    from medtee.attestation.evidence import GpuEvidence

    doc = _object(doc, where, ("report",), ("certificates", "cc_feature", "devtools_mode"))
    flags = {k: doc.get(k) for k in ("cc_feature", "devtools_mode")}
    if any(v is not None and not isinstance(v, bool) for v in flags.values()):
        raise RequestError(f"{where}: cc_feature and devtools_mode must be true, false or null")
    return GpuEvidence(report=decode_b64(doc["report"], f"{where}.report", MAX_GPU_REPORT_BYTES),
                       certificates=_certificates(doc.get("certificates", []), f"{where}.certificates"), **flags)


def _evidence(doc: object) -> Evidence:
    from medtee.attestation.evidence import Evidence

    doc = _object(doc, "evidence", ("provider", "snp_report"), ("simulated", "certificates", "gpus"))
    if not isinstance(doc["provider"], str) or not _PROVIDER.fullmatch(doc["provider"]):
        raise RequestError("evidence.provider must be 1 to 64 letters, digits, '.', '_' or '-'")
    if not isinstance(doc.get("simulated", False), bool):
        raise RequestError("evidence.simulated must be true or false")
    gpus = _items(doc.get("gpus", []), "evidence.gpus", MAX_GPUS)
    return Evidence(provider=doc["provider"], simulated=doc.get("simulated", False),
                    snp_report=decode_b64(doc["snp_report"], "evidence.snp_report", MAX_REPORT_BYTES),
                    certificates=_certificates(doc.get("certificates", []), "evidence.certificates"),
                    gpus=tuple(_gpu(g, f"evidence.gpus[{i}]") for i, g in enumerate(gpus)))


def _receipt_key(value: object) -> bytes:
    return decode_b64(value, "receipt_public_key", RECEIPT_KEY_BYTES, RECEIPT_KEY_BYTES)


MAX_RECIPE_BYTES = 256 << 10  # of a release request's recipe, as canonical JSON


def _recipe(value: object) -> dict:
    """The recipe a release is for: a JSON object (its digest, checked by the broker, is the recipe_digest)."""
    if not isinstance(value, dict):
        raise RequestError("recipe must be a JSON object (the recipe the recipe_digest covers)")
    try:
        size = len(canonical_json(value))
    except (TypeError, ValueError):
        raise RequestError("recipe must be plain JSON (no NaN or infinity)") from None
    if size > MAX_RECIPE_BYTES:
        raise RequestError(f"recipe must be at most {MAX_RECIPE_BYTES} bytes as canonical JSON")
    return value


_RELEASE_FIELDS: dict[str, Callable[[object], object]] = {
    "dataset_id": _dataset_id,
    "nonce": lambda v: decode_b64(v, "nonce", MAX_NONCE_BYTES, MIN_NONCE_BYTES),
    "evidence": _evidence,
    "ephemeral_public_key": lambda v: decode_b64(v, "ephemeral_public_key", MAX_PUBLIC_KEY_BYTES),
    "recipe_digest": lambda v: check_digest(v, "recipe_digest"),
    "manifest_digest": lambda v: check_digest(v, "manifest_digest"),
}
_OPTIONAL_RELEASE_FIELDS: dict[str, Callable[[object], object]] = {"receipt_public_key": _receipt_key,
                                                                   "recipe": _recipe}


def parse_challenge_request(doc: object) -> str:
    """The dataset id of a challenge request `{"dataset_id"}`, or RequestError."""
    return _dataset_id(_object(doc, "challenge request", ("dataset_id",))["dataset_id"])


def parse_release_request(doc: object) -> dict:
    """KeyBroker.release's keyword arguments from a release request's JSON.

    RequestError lists every bad field; its `fields` holds the fields that passed (what the broker may audit).
    """
    if not isinstance(doc, dict):
        raise RequestError("release request must be a JSON object")
    fields, problems = {}, []
    for name, parse in {**_RELEASE_FIELDS, **_OPTIONAL_RELEASE_FIELDS}.items():
        if name not in doc:
            if name in _RELEASE_FIELDS:
                problems.append(f"missing field {name}")
            continue
        try:
            fields[name] = parse(doc[name])
        except RequestError as e:
            problems.append(str(e))
    if not doc.keys() <= {*_RELEASE_FIELDS, *_OPTIONAL_RELEASE_FIELDS}:
        problems.append(f"unknown field(s); allowed: {', '.join([*_RELEASE_FIELDS, *_OPTIONAL_RELEASE_FIELDS])}")
    if problems:
        raise RequestError("release request: " + "; ".join(problems), fields)
    return fields


def check_close_record(record: object) -> dict:
    """`record` if it is a JSON object whose canonical JSON has at most MAX_CLOSE_RECORD_BYTES, else RequestError."""
    if not isinstance(record, dict):
        raise RequestError("record must be a JSON object (the run's teardown record)")
    try:
        size = len(canonical_json(record))
    except (TypeError, ValueError):
        raise RequestError("record must hold only JSON values (strings, finite numbers, booleans, null, lists, "
                           "objects with string keys)") from None
    if size > MAX_CLOSE_RECORD_BYTES:
        raise RequestError(f"record must be at most {MAX_CLOSE_RECORD_BYTES} bytes of canonical JSON")
    return record


CLOSE_TAG = b"medtee/release-close/v1\n"
RECEIPT_KEY_BYTES, SIGNATURE_BYTES = 32, 64  # Ed25519


def close_message(release_id: str, record: dict) -> bytes:
    """What the receipt key signs to close a release: a domain tag, the release id and the record's digest."""
    return CLOSE_TAG + check_digest(release_id, "release_id").encode() + b"\n" + record_digest(record).encode()


#: The one answer to every close refused for lack of authority (`CloseNotAuthorized`, HTTP 403): it names each
#: possible cause and the fix, never which one applied (the audit log's `close_refused` entry does).
CLOSE_REFUSED = ("close refused: release_id names no release of this broker, or one made without a receipt key "
                 "(it cannot be closed), or receipt_public_key is not the key the release bound, or signature is not "
                 "that key's Ed25519 signature of close_message(release_id, record); sign close_message with the "
                 "receipt key given to the release of this release_id")


def close_signature_valid(release_id: str, record: dict, receipt_public_key: bytes, signature: bytes) -> bool:
    """Whether `signature` is `receipt_public_key`'s Ed25519 signature of `close_message(release_id, record)`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes(receipt_public_key)).verify(bytes(signature),
                                                                             close_message(release_id, record))
    except (InvalidSignature, ValueError):
        return False
    return True


def parse_close_request(doc: object) -> tuple[str, dict, bytes, bytes]:
    """(release id, teardown record, receipt public key, signature) of a close request `{"release_id", "record",
    "receipt_public_key", "signature"}` (both base64), or RequestError."""
    doc = _object(doc, "close request", ("release_id", "record", "receipt_public_key", "signature"))
    key = decode_b64(doc["receipt_public_key"], "receipt_public_key", RECEIPT_KEY_BYTES, RECEIPT_KEY_BYTES)
    signature = decode_b64(doc["signature"], "signature", SIGNATURE_BYTES, SIGNATURE_BYTES)
    return check_digest(doc["release_id"], "release_id"), check_close_record(doc["record"]), key, signature


# -- the TEE's side --------------------------------------------------------------------------------------------------
def obtain_data_key(broker: KeyBroker, *, dataset_id: str, manifest_digest: str, recipe_digest: str,
                    evidence_for: Callable[[bytes, bytes], Evidence], scheme: Scheme | str = DEFAULT_SCHEME,
                    receipt_public_key: bytes | None = None, recipe: dict | None = None) -> Release:
    """The TEE's half of key release: challenge, ephemeral key, evidence, release, unwrap.

    `evidence_for(nonce, ephemeral_public_key) -> Evidence` collects evidence whose REPORT_DATA is
    `medtee.attestation.report_data(nonce=..., ephemeral_public_key=..., recipe_digest=recipe_digest,
    receipt_public_key=receipt_public_key, gpu_evidence_digests=...)`: the caller closes over the receipt key (the
    broker recomputes REPORT_DATA with the key given here, so evidence that leaves it out is denied,
    `binding.report_data`). The ephemeral private key never leaves this function.
    """
    nonce = broker.challenge(dataset_id)
    key = EphemeralKey.generate(scheme)
    evidence = evidence_for(nonce, key.public_bytes)
    blob, record = broker.release(dataset_id=dataset_id, nonce=nonce, evidence=evidence,
                                  ephemeral_public_key=key.public_bytes, recipe_digest=recipe_digest,
                                  manifest_digest=manifest_digest, receipt_public_key=receipt_public_key,
                                  recipe=recipe)
    return Release(data_key=SecretBuffer(key.unwrap(blob, info=release_info(dataset_id, nonce))),
                   release_id=record.release_id, audit_entry_sha256=record.audit_entry_sha256, nonce=bytes(nonce),
                   ephemeral_public_key=key.public_bytes)
