"""Offline verification of a receipt: every check named, with pass/fail and a short reason.

Checks: `signature` (DSSE, by the receipt key the predicate names), `binding` (REPORT_DATA and each GPU nonce
recomputed from the predicate's binding inputs, recipe digest and the evidence's GPU digests equal the evidence's),
`attestation` (the evidence appraised by `medtee.attestation.appraise` under the verifier's policy: the one given,
or the shipped policy of the name the receipt records, never the content it records), `authenticity` (SIMULATED
evidence passes only a policy that allows it and is never production), `policy` (the recorded policy is the one
appraised here), `recipe.digest` (the recorded recipe hashes to its digest), `file <path>` for each file given
(its SHA-256 must equal a subject's), `dataset` for a sealed dataset directory given (its manifest must be the
one the receipt names) and, for the key broker's audit log given, `broker.release` (its release entry records what
the receipt says was released to whom) and `broker.close` (its close entry records the receipt's teardown record). Input that cannot be read as a receipt raises UnusableInput, distinct from a
receipt that reads but is rejected. With the shipped policies nothing here opens a network connection (their KDS
fetching is off).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from medtee.broker.protocol import canonical_json
from medtee.schema import differing
from medtee.receipt.statement import OUTCOMES, PAYLOAD_TYPE, PREDICATE_TYPE, SIMULATED_AUTHENTICITY, STATEMENT_TYPE

if TYPE_CHECKING:
    from medtee.attestation.evidence import Evidence
    from medtee.attestation.policy import AttestationPolicy
    from medtee.attestation.verdict import Verdict

_PREDICATE_FIELDS = ("authenticity", "simulated", "medtee", "recipe", "base_model", "dataset", "attestation",
                     "binding", "release", "run", "teardown")


class UnusableInput(ValueError):
    """The input is not a receipt this verifier can read (not JSON, not DSSE, wrong payload type, fields missing)."""


@dataclass(frozen=True)
class ReceiptCheck:
    """One named verification check."""

    name: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class ReceiptVerification:
    """Every check of one verification; `verdict` is the appraisal of the receipt's evidence, `claims` what the
    receipt says was done (outcome, dataset, recipe, release), which the checks prove only when all pass."""

    checks: tuple[ReceiptCheck, ...]
    policy: str
    simulated: bool
    verdict: Verdict
    claims: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> tuple[ReceiptCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def to_json(self) -> dict:
        return {"ok": self.ok, "policy": self.policy, "simulated": self.simulated, "claims": self.claims,
                "checks": [dataclasses.asdict(c) for c in self.checks]}


def _field(doc: object, path: str, kind: type | tuple[type, ...] = dict, where: str = "predicate."):
    """doc[a][b]... for path "a.b..." (of the predicate, unless `where` says otherwise), which must be a `kind`;
    UnusableInput naming the path otherwise."""
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            raise UnusableInput(f"receipt: the statement has no '{where}{path}'")
        doc = doc[part]
    if not isinstance(doc, kind):
        raise UnusableInput(f"receipt: '{where}{path}' has the wrong type")
    return doc


def _bytes(predicate: dict, path: str) -> bytes:
    try:
        return base64.b64decode(_field(predicate, path, str), validate=True)
    except binascii.Error:
        raise UnusableInput(f"receipt: 'predicate.{path}' is not base64") from None


class _RepeatedKey(ValueError):
    """A JSON object names a key twice (parsers differ on which value counts)."""


def _object(pairs: list) -> dict:
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise _RepeatedKey(key)
        doc[key] = value
    return doc


def _json(data: bytes, what: str, not_json: str):
    """`data` parsed as JSON whose objects name each key once; UnusableInput (`not_json`, or naming the repeated key
    of the `what`) otherwise."""
    try:
        return json.loads(data, object_pairs_hook=_object)
    except _RepeatedKey as exc:
        raise UnusableInput(f"receipt: the {what} repeats the key {str(exc)!r}; use the receipt the run "
                            f"wrote") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UnusableInput(f"receipt: {not_json}") from None


def _signatures(doc: dict) -> list[dict]:
    """The envelope's signatures as securesystemslib reads them ({keyid, sig}); UnusableInput naming what is wrong."""
    signatures = doc["signatures"]
    if not isinstance(signatures, list):
        raise UnusableInput("receipt: malformed DSSE envelope: signatures must be a list of {keyid, sig}")
    if not isinstance(doc["payload"], str) or not isinstance(doc["payloadType"], str) or not all(
            isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
            for s in signatures):
        raise UnusableInput("receipt: malformed DSSE envelope: payload, payloadType and each signature's keyid and "
                            "sig must be strings")
    seen = set()
    for s in signatures:
        if s["keyid"] in seen:
            raise UnusableInput(f"receipt: malformed DSSE envelope: two signatures with keyid {s['keyid']!r}")
        seen.add(s["keyid"])
    return [{"keyid": s["keyid"], "sig": s["sig"]} for s in signatures]


def parse_envelope(data: bytes):
    """The DSSE Envelope and its Statement; UnusableInput when either cannot be read."""
    from securesystemslib.dsse import Envelope

    doc = _json(data, "envelope", "not a JSON document (expected a DSSE envelope, receipt.dsse.json)")
    if not isinstance(doc, dict) or not {"payload", "payloadType", "signatures"} <= doc.keys():
        raise UnusableInput("receipt: not a DSSE envelope (needs payload, payloadType, signatures)")
    signatures = _signatures(doc)
    try:
        envelope = Envelope.from_dict({**doc, "signatures": signatures})
    except ValueError:  # binascii.Error, or UnicodeEncodeError for a lone surrogate
        raise UnusableInput("receipt: malformed DSSE envelope: the payload or a signature is not base64") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise UnusableInput(f"receipt: payloadType must be {PAYLOAD_TYPE}")
    statement = _json(envelope.payload, "payload", "the DSSE payload is not JSON")
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise UnusableInput(f"receipt: the payload is not an in-toto Statement ({STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise UnusableInput(f"receipt: predicateType must be {PREDICATE_TYPE} (this verifier reads no other)")
    for name in _PREDICATE_FIELDS:
        _field(statement, f"predicate.{name}", object, where="")
    return envelope, statement


def _named_policy(predicate: dict) -> AttestationPolicy:
    """The shipped policy of the name the receipt records: the verifier's own copy, never the receipt's content (a
    receipt can record any policy it likes)."""
    from medtee.attestation.policy import load_policy

    name = _field(predicate, "attestation.policy.name", str)
    try:
        return load_policy(name)
    except ValueError:
        raise UnusableInput(f"receipt: it names the policy {name!r}, which this medtee does not ship; pass the "
                            f"policy you trust: --policy NAME|FILE") from None


def _recorded_policy_check(predicate: dict, policy: AttestationPolicy, *, chosen: bool) -> ReceiptCheck:
    """Whether the policy the run recorded is the one appraised here. Without --policy (`chosen`) they must be the
    same: a receipt that records its own variant of a shipped policy's name fails. With --policy the verifier's
    policy decides and a difference is only reported."""
    from medtee.receipt.statement import policy_content

    recorded = _field(predicate, "attestation.policy.content")
    differ = differing(recorded, policy_content(policy))
    if not differ:
        return ReceiptCheck("policy", True, f"the run applied policy '{policy.name}', as verified here")
    fields = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
    reason = (f"the run recorded a policy named '{predicate['attestation']['policy']['name']}' whose content differs "
              f"from the policy '{policy.name}' verified here in {fields}")
    if chosen:
        return ReceiptCheck("policy", True, reason)
    version = predicate["medtee"].get("version") if isinstance(predicate["medtee"], dict) else None
    return ReceiptCheck("policy", False, f"{reason} (the receipt was written by medtee {version}); verify it under the "
                                         f"policy you trust: --policy NAME|FILE")




def _signature(envelope, receipt_key: bytes) -> ReceiptCheck:
    from securesystemslib.exceptions import VerificationError

    from medtee.receipt.signing import sslib_key

    key = sslib_key(receipt_key)
    try:
        envelope.verify([key], 1)
    except VerificationError:
        return ReceiptCheck("signature", False, f"no DSSE signature verifies with the receipt key the predicate "
                                                f"names (key id {key.keyid[:16]}): envelope or payload altered")
    return ReceiptCheck("signature", True, f"DSSE signature by receipt key {key.keyid[:16]}")


def _expected(predicate: dict, receipt_key: bytes, evidence: Evidence) -> tuple[bytes, bytes | None]:
    from medtee.attestation.binding import gpu_nonce, report_data

    bound = dict(nonce=_bytes(predicate, "binding.nonce"),
                 ephemeral_public_key=_bytes(predicate, "binding.ephemeral_public_key"),
                 recipe_digest=_field(predicate, "recipe.digest", str), receipt_public_key=receipt_key)
    try:
        rd = report_data(**bound, gpu_evidence_digests=evidence.gpu_evidence_digests())
        return rd, gpu_nonce(**bound) if evidence.gpus else None
    except ValueError as exc:
        raise UnusableInput(f"receipt: predicate.binding: {exc}") from None


def _is_binding(name: str) -> bool:
    return name == "binding.report_data" or name.endswith("].nonce")


def _binding(verdict: Verdict) -> ReceiptCheck:
    checks = [c for c in verdict.checks if _is_binding(c.name)]
    if not checks:
        return ReceiptCheck("binding", False, "no REPORT_DATA to compare: the evidence has no readable CPU report")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        return ReceiptCheck("binding", False, f"{', '.join(failed)} differ from the binding recomputed with the "
                                              "receipt key: this key was not bound into the evidence")
    return ReceiptCheck("binding", True, "REPORT_DATA (and every GPU nonce) binds nonce, ephemeral key, recipe "
                                         "digest and this receipt key")


def _attestation(verdict: Verdict) -> ReceiptCheck:
    others = [c for c in verdict.checks if not _is_binding(c.name)]
    failed = [c for c in others if not c.ok]
    if failed:
        return ReceiptCheck("attestation", False, f"rejected under policy '{verdict.policy}': " + "; ".join(
            f"{c.name} (expected {c.expected}, got {c.actual})" for c in failed))
    return ReceiptCheck("attestation", bool(others), f"{len(others)} checks passed under policy '{verdict.policy}'")


def _authenticity(predicate: dict, evidence: Evidence, policy: AttestationPolicy) -> ReceiptCheck:
    claimed = _field(predicate, "simulated", bool)
    if claimed != evidence.simulated:
        return ReceiptCheck("authenticity", False, f"the predicate says simulated={str(claimed).lower()}, the "
                                                   f"evidence says simulated={str(evidence.simulated).lower()}")
    if not evidence.simulated:
        return ReceiptCheck("authenticity", True, "hardware evidence (appraised under 'attestation')")
    if policy.allow_simulated and not policy.production:
        return ReceiptCheck("authenticity", True, f"{SIMULATED_AUTHENTICITY} (accepted only because policy "
                                                  f"'{policy.name}' allows simulated evidence)")
    return ReceiptCheck("authenticity", False, f"{SIMULATED_AUTHENTICITY}; policy '{policy.name}' refuses it")


def _recipe_digest(predicate: dict) -> ReceiptCheck:
    recorded = _field(predicate, "recipe.digest", str)
    try:
        actual = hashlib.sha256(canonical_json(_field(predicate, "recipe.resolved"))).hexdigest()
    except ValueError:
        raise UnusableInput("receipt: predicate.recipe.resolved holds a value JSON cannot (NaN or infinity)") from None
    if actual != recorded:
        return ReceiptCheck("recipe.digest", False, f"the recorded recipe hashes to {actual[:16]}..., the predicate "
                                                    f"(and the binding) name {recorded[:16]}...")
    return ReceiptCheck("recipe.digest", True, "the recorded recipe hashes to the bound recipe digest")


def _sha256(path: Path | str) -> str:
    """SHA-256 hex of the regular file `path` (never a FIFO or device: reading one could block or never end)."""
    from medtee.files import NotRegularFile, sha256_file

    try:
        return sha256_file(path)
    except NotRegularFile as exc:
        raise UnusableInput(f"{path}: {exc}; give the output file itself") from None
    except OSError as exc:
        raise UnusableInput(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def _files(statement: dict, files: Sequence[Path | str]) -> list[ReceiptCheck]:
    subjects = {}
    for i, s in enumerate(_field(statement, "subject", list, where="")):
        subjects.setdefault(_field(s, "digest.sha256", str, f"subject[{i}]."), _field(s, "name", str, f"subject[{i}]."))
    out = []
    for path in files:
        digest = _sha256(path)
        name = subjects.get(digest)
        out.append(ReceiptCheck(f"file {path}", name is not None,
                                f"matches subject {name}" if name else f"sha256 {digest[:16]}... matches no subject "
                                                                       "of the receipt (altered or another run's)"))
    return out


def _dataset(predicate: dict, directory: Path | str) -> ReceiptCheck:
    """Whether the sealed dataset at `directory` has the manifest the key was released for, and the shards (and
    canary file) that manifest lists, each of its size and SHA-256, and no other file."""
    from medtee.sealing.manifest import Manifest
    from medtee.sealing.reader import open_dataset

    try:
        manifest = Manifest.load(directory)
    except ValueError as exc:  # SealedDataError: names the file and the fix
        raise UnusableInput(f"--dataset {exc}") from None
    claimed = (_field(predicate, "dataset.id", str), _field(predicate, "dataset.manifest_digest", str))
    actual = (manifest.dataset_id, manifest.digest())
    if actual != claimed:
        rotated = ("; a `medtee keys rotate` since the run gives the manifest another digest: check against the "
                   "manifest of the run's time") if actual[0] == claimed[0] else ""
        return ReceiptCheck("dataset", False, f"{directory} is dataset '{actual[0]}' (manifest {actual[1][:16]}...); "
                                              f"the key was released for '{claimed[0]}' (manifest {claimed[1][:16]}...)"
                                              f"{rotated}")
    try:
        open_dataset(directory)
    except ValueError as exc:  # SealedDataError: the shard missing, extra, altered or swapped
        return ReceiptCheck("dataset", False, f"{directory} has the manifest the key was released for, but {exc}")
    return ReceiptCheck("dataset", True, f"{directory} is dataset '{actual[0]}' with the manifest the key was released "
                                         f"for ({actual[1][:16]}...) and every shard it lists")


def _broker_log(predicate: dict, evidence: Evidence, receipt_key: bytes, path: Path | str,
                head: str | None) -> list[ReceiptCheck]:
    """`broker.log`, `broker.head`, `broker.release` and `broker.close`: the data owner's audit log (read once,
    verified as a chain) holds the entry `head` (the head the owner anchored outside the log) when given, and the
    release the receipt names, with the dataset, manifest, recipe, evidence, nonce and receipt key the receipt
    records, and its close with the digest of the receipt's teardown record, both within the anchored entries."""
    from medtee.broker.audit import verify
    from medtee.broker.protocol import record_digest
    from medtee.files import NotRegularFile, open_regular

    release_id = _field(predicate, "release.release_id", str)
    found: dict[str, dict] = {}
    closes: list[dict] = []

    def visit(entry: dict) -> None:
        if entry.get("event") == "release" and entry.get("hash") == release_id:
            found.setdefault("release", entry)
        elif entry.get("event") == "close" and entry.get("release_id") == release_id:
            closes.append(entry)
        if entry.get("hash") == head:
            found["head"] = entry

    try:
        f = open_regular(path)[0]  # never a FIFO or device: reading one could block
    except FileNotFoundError:
        raise UnusableInput(f"--broker-log {path}: no such file; give the broker's audit.log") from None
    except NotRegularFile as exc:
        raise UnusableInput(f"--broker-log {path} {exc}; give the broker's audit.log") from None
    except OSError as exc:
        raise UnusableInput(f"--broker-log {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        with f:
            report = verify(path, f=f, visit=visit)
    except OSError as exc:
        raise UnusableInput(f"--broker-log {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not report.ok:
        return [ReceiptCheck("broker.log", False, f"{path} fails verification after {report.entries} entries: "
                                                  f"{report.problem}")]
    out, covered = [], None
    if head is not None:
        anchored = found.get("head")
        covered = anchored["seq"] if anchored else -1
        out.append(ReceiptCheck("broker.head", anchored is not None,
                                f"entry seq {covered} of {path} is the anchored head {head[:16]}...: the entries up to "
                                f"it are those the data owner anchored" if anchored else
                                f"{path} ({report.entries} entries, head {report.head[:16]}...) holds no entry "
                                f"{head[:16]}...: it is not the log whose head was anchored, or it was cut short "
                                f"before it"))
    release = found.get("release")
    if release is None:
        return [*out, ReceiptCheck("broker.release", False, f"{path} ({report.entries} entries, head "
                                                            f"{report.head[:16]}...) has no release {release_id[:16]}...")]
    claimed = {"dataset_id": _field(predicate, "dataset.id", str),
               "manifest_digest": _field(predicate, "dataset.manifest_digest", str),
               "recipe_digest": _field(predicate, "recipe.digest", str), "evidence": evidence.digest(),
               "nonce": _bytes(predicate, "binding.nonce").hex()[:16],
               "receipt_key": hashlib.sha256(receipt_key).hexdigest()}
    differ = sorted(k for k, v in claimed.items() if release.get(k) != v)
    if _field(predicate, "release.audit_entry_sha256", str) != release_id:
        differ.append("audit_entry_sha256")
    spend = release.get("dp_spend")
    spent = (f"; dp_spend epsilon {spend['epsilon']:g}, delta {spend['delta']:g}" if isinstance(spend, dict) and
             all(isinstance(spend.get(k), (int, float)) for k in ("epsilon", "delta")) else
             f"; dp_spend {spend}" if isinstance(spend, str) else "")
    out.append(ReceiptCheck("broker.release", not differ and _anchored(release, covered),
                            f"the log's release entry (seq {release.get('seq')}) records other {', '.join(differ)}"
                            if differ else _after_head(release, covered) or
                            f"release entry seq {release.get('seq')} of {path} records the dataset, manifest, "
                            f"recipe, evidence, nonce and receipt key of the receipt{spent}"))
    close_hash = _field(predicate, "release.close_audit_entry_sha256", (str, type(None)))
    close = closes[0] if closes else None
    record = record_digest(_field(predicate, "teardown"))
    if len(closes) > 1:
        out.append(ReceiptCheck("broker.close", False, f"the log closes this release {len(closes)} times: not a "
                                                       f"log the broker writes (it refuses a second close)"))
    elif close is not None and not _anchored(close, covered):
        out.append(ReceiptCheck("broker.close", False, _after_head(close, covered)))
    elif close is None:
        out.append(ReceiptCheck("broker.close", False, "the log has no close of this release: the broker never "
                                                       "received the teardown record" + (
                                                           "" if close_hash else " (the receipt says so too)")))
    elif close.get("record_sha256") != record:
        out.append(ReceiptCheck("broker.close", False, f"the close entry (seq {close.get('seq')}) has another "
                                                       f"teardown record than the receipt's"))
    elif close_hash not in (None, close.get("hash")):
        out.append(ReceiptCheck("broker.close", False, f"the receipt names close entry {close_hash[:16]}..., the log's "
                                                       f"is {close.get('hash', '')[:16]}..."))
    else:
        out.append(ReceiptCheck("broker.close", True, f"close entry seq {close.get('seq')} records the digest of the "
                                                      f"receipt's teardown record"))
    return out


def _anchored(entry: dict, covered: int | None) -> bool:
    """Whether `entry` is at or before the anchored head's seq `covered` (None: no head given, nothing to check)."""
    return covered is None or entry["seq"] <= covered


def _after_head(entry: dict, covered: int | None) -> str:
    """Why `entry` is not covered by the anchored head ('' when it is)."""
    if _anchored(entry, covered):
        return ""
    if covered < 0:
        return f"the {entry['event']} entry (seq {entry['seq']}) cannot be checked against an anchored head the log lacks"
    return (f"the {entry['event']} entry (seq {entry['seq']}) comes after the anchored head (seq {covered}), so the "
            f"anchor does not vouch for it: ask the data owner for a head anchored after the run's close")


def _claims(statement: dict) -> dict:
    predicate = statement["predicate"]
    return {"outcome": _field(predicate, "run.outcome", str),
            "error_type": _field(predicate, "run.error_type", (str, type(None))),
            "dataset_id": _field(predicate, "dataset.id", str),
            "manifest_digest": _field(predicate, "dataset.manifest_digest", str),
            "recipe_digest": _field(predicate, "recipe.digest", str),
            "release_id": _field(predicate, "release.release_id", str),
            "subjects": [s["name"] for s in statement["subject"]]}


def _evidence(predicate: dict) -> Evidence:
    from medtee.attestation.evidence import Evidence, EvidenceFormatError

    try:
        return Evidence.from_json(_field(predicate, "attestation.evidence"))
    except EvidenceFormatError as exc:
        raise UnusableInput(f"receipt: predicate.attestation.{exc}") from None


def verify_receipt(data: bytes, *, files: Sequence[Path | str] = (), policy: AttestationPolicy | None = None,
                   now: datetime | None = None, dataset: Path | str | None = None,
                   broker_log: Path | str | None = None, broker_head: str | None = None) -> ReceiptVerification:
    """Verify the receipt `data` (receipt.dsse.json's bytes), `files`, the sealed `dataset` directory and the key
    broker's audit log `broker_log` against it, under `policy` (default: the shipped policy of the name the receipt
    records, never the content it records) as of `now` (default: the current time); `broker_head` (with
    `broker_log`) is the log's head as the data owner anchored it outside the log. UnusableInput for unreadable
    input."""
    from medtee.attestation.appraise import appraise

    if broker_head is not None and (broker_log is None or not re.fullmatch(r"[0-9a-f]{64}", broker_head)):
        raise UnusableInput("--broker-head needs --broker-log" if broker_log is None else
                            f"--broker-head must be the 64 lowercase hex digits of an audit entry's hash (the head "
                            f"`medtee broker audit verify` prints); got {broker_head[:80]!r}")
    envelope, statement = parse_envelope(data)
    predicate = statement["predicate"]
    receipt_key = _bytes(predicate, "binding.receipt_public_key")
    if len(receipt_key) != 32:
        raise UnusableInput("receipt: predicate.binding.receipt_public_key must be a raw 32-byte Ed25519 key")
    if _field(predicate, "run.outcome", str) not in OUTCOMES:
        raise UnusableInput(f"receipt: predicate.run.outcome must be one of {', '.join(OUTCOMES)}")
    evidence = _evidence(predicate)
    chosen = policy is not None
    policy = policy or _named_policy(predicate)
    if policy.authenticity_only:
        raise UnusableInput(f"policy '{policy.name}' checks only that evidence is genuine: no run releases a key under "
                            f"it, so a receipt is never verified under it; pass the release policy you trust: "
                            f"--policy NAME|FILE")
    expected_rd, expected_gpu = _expected(predicate, receipt_key, evidence)
    verdict = appraise(evidence, policy, expected_report_data=expected_rd, expected_gpu_nonce=expected_gpu, now=now,
                       recipe_digest=_field(predicate, "recipe.digest", str), recipe=_field(predicate, "recipe.resolved"))
    checks = [_signature(envelope, receipt_key), _binding(verdict), _attestation(verdict),
              _authenticity(predicate, evidence, policy), _recorded_policy_check(predicate, policy, chosen=chosen),
              _recipe_digest(predicate), *_files(statement, files)]
    if dataset is not None:
        checks.append(_dataset(predicate, dataset))
    if broker_log is not None:
        checks += _broker_log(predicate, evidence, receipt_key, broker_log, broker_head)
    return ReceiptVerification(tuple(checks), policy=policy.name, simulated=evidence.simulated, verdict=verdict,
                               claims=_claims(statement))
