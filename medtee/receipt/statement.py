"""The training receipt as an in-toto Statement v1 with predicate type `https://medtee.dev/receipt/v1`.

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "recipe", "digest": {"sha256": RECIPE_DIGEST}}, {"name": FILE, "digest": {"sha256": HEX}}...],
     "predicateType": "https://medtee.dev/receipt/v1",
     "predicate": {
       "authenticity": "SIMULATED: ..." | "hardware: ...",   "simulated": bool,
       "medtee": {"version", "source_digest"},
       "recipe": {"resolved": {...}, "digest": HEX},          digest = SHA-256 of the canonical JSON of resolved
       "base_model": {"revision", "weight_digests": {file: HEX}},
       "dataset": {"id", "manifest_digest"},
       "attestation": {"evidence": Evidence.to_json(), "policy": {"name", "content"}, "verdict": Verdict.to_json()},
       "binding": {"nonce", "ephemeral_public_key", "receipt_public_key" (base64), "receipt_key_id" (SHA-256 hex)},
       "release": {"release_id", "audit_entry_sha256", "close_audit_entry_sha256" (or null)},
       "run": {"started", "ended" (UTC ISO-8601), "outcome": "done" | "failed", "error_type" (or null), "metrics"},
       "teardown": {...}}}

The binding inputs, the recipe digest and the evidence's GPU digests recompute REPORT_DATA and the GPU nonce
(`medtee.attestation.binding`), so a verifier needs nothing but the receipt, the AMD/NVIDIA roots and a policy.
The payload is the statement's canonical JSON (`medtee.broker.protocol.canonical_json`). See docs/receipt.md.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medtee.broker.protocol import canonical_json

if TYPE_CHECKING:
    from medtee.attestation.evidence import Evidence
    from medtee.attestation.policy import AttestationPolicy
    from medtee.attestation.verdict import Verdict
    from medtee.broker.protocol import Release

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://medtee.dev/receipt/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
RECIPE_SUBJECT = "recipe"
SOURCE_SUFFIXES = (".py", ".yaml", ".pem")
SIMULATED_AUTHENTICITY = ("SIMULATED: the attestation evidence is signed by a development key made inside the run; "
                          "this receipt proves nothing about where or how the run ran")
HARDWARE_AUTHENTICITY = "hardware: AMD SEV-SNP (and NVIDIA GPU) evidence; appraise it under your own policy"
OUTCOMES = ("done", "failed")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def source_digest(package_dir: Path | str | None = None) -> str:
    """SHA-256 hex over the installed `medtee` package's .py/.yaml/.pem files: for each, sorted by relative POSIX
    path, `u32be(len(path)) || path || u64be(len(content)) || content` (caches and other files left out)."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parents[1]
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for rel, path in files:
        content = path.read_bytes()
        name = rel.encode("utf-8")
        digest.update(struct.pack(">I", len(name)) + name + struct.pack(">Q", len(content)) + content)
    return digest.hexdigest()


def file_subjects(paths: Iterable[Path | str]) -> dict[str, str]:
    """{file name: SHA-256 hex} of output files, for `build_statement(subjects=...)`."""
    from medtee.files import sha256_file

    return {Path(p).name: sha256_file(p) for p in paths}


def policy_content(policy: AttestationPolicy) -> dict:
    """A policy as plain data (enums as strings), loadable again with `policy_from_mapping`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(policy), enum_to_str=True)


def _utc(when: datetime, what: str) -> str:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise ValueError(f"receipt: {what} must be a timezone-aware datetime (datetime.now(timezone.utc))")
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    ok = all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for k, v in metrics.items())
    if not ok:
        raise ValueError("receipt: metrics must map names to finite numbers (the guard's allow-listed aggregates)")
    return dict(metrics)


def _json_ready(doc: dict, what: str) -> dict:
    try:
        canonical_json(doc)
    except (TypeError, ValueError):
        raise ValueError(f"receipt: {what} must hold only JSON values (no NaN, string keys)") from None
    return doc


def _subjects(recipe_digest: str, subjects: Mapping[str, str]) -> list[dict]:
    out = [{"name": RECIPE_SUBJECT, "digest": {"sha256": recipe_digest}}]
    for name, digest in subjects.items():
        if not isinstance(name, str) or not name or name == RECIPE_SUBJECT or not _HEX64.fullmatch(str(digest)):
            raise ValueError(f"receipt: subject {name!r} needs a file name (not '{RECIPE_SUBJECT}') and a SHA-256 hex "
                             "digest; use file_subjects(paths)")
        out.append({"name": name, "digest": {"sha256": digest}})
    return out


def build_statement(*, recipe: dict, recipe_digest: str, model_revision: str | None, weight_digests: Mapping[str, str],
                    dataset_id: str, manifest_digest: str, evidence: Evidence, policy: AttestationPolicy,
                    verdict: Verdict, release: Release, receipt_public_key: bytes, started: datetime,
                    ended: datetime, metrics: Mapping[str, float], teardown: dict, error: BaseException | None = None,
                    subjects: Mapping[str, str] | None = None, close_audit_entry_sha256: str | None = None) -> dict:
    """The receipt Statement of one run whose data key was released (see the module docstring).

    `recipe` is the resolved recipe as its digest covers it (`config.digest_input(...)`), `recipe_digest` that
    digest; `policy`/`verdict` the run's own appraisal of `evidence`; `release` what `obtain_data_key` returned;
    `error` the exception a failed run ended with (only its type name is recorded); `subjects` {file name: SHA-256
    hex} of the outputs (`file_subjects`); `teardown` the record also given to `close_release`.
    """
    from medtee import __version__

    if not _HEX64.fullmatch(recipe_digest or ""):
        raise ValueError("receipt: recipe_digest must be 64 lowercase hex characters (config.recipe_digest)")
    return {
        "_type": STATEMENT_TYPE,
        "subject": _subjects(recipe_digest, subjects or {}),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "authenticity": SIMULATED_AUTHENTICITY if evidence.simulated else HARDWARE_AUTHENTICITY,
            "simulated": evidence.simulated,
            "medtee": {"version": __version__, "source_digest": source_digest()},
            "recipe": {"resolved": _json_ready(recipe, "recipe"), "digest": recipe_digest},
            "base_model": {"revision": model_revision, "weight_digests": dict(sorted(weight_digests.items()))},
            "dataset": {"id": dataset_id, "manifest_digest": manifest_digest},
            "attestation": {"evidence": evidence.to_json(),
                            "policy": {"name": policy.name, "content": policy_content(policy)},
                            "verdict": verdict.to_json()},
            "binding": {"nonce": _b64(release.nonce), "ephemeral_public_key": _b64(release.ephemeral_public_key),
                        "receipt_public_key": _b64(receipt_public_key),
                        "receipt_key_id": hashlib.sha256(receipt_public_key).hexdigest()},
            "release": {"release_id": release.release_id, "audit_entry_sha256": release.audit_entry_sha256,
                        "close_audit_entry_sha256": close_audit_entry_sha256},
            "run": {"started": _utc(started, "started"), "ended": _utc(ended, "ended"),
                    "outcome": "failed" if error is not None else "done",
                    "error_type": type(error).__name__ if error is not None else None,
                    "metrics": _metrics(metrics)},
            "teardown": _json_ready(teardown, "teardown"),
        },
    }


def statement_bytes(statement: dict) -> bytes:
    """The DSSE payload: the statement's canonical JSON."""
    return canonical_json(statement)
