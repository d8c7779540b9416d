"""Evidence providers by name, the file provider, and evidence collection in binding order."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medtee.attestation.binding import gpu_nonce, report_data
from medtee.attestation.evidence import Evidence, EvidenceProvider

NAMES = ("simulated", "sev-snp", "nvidia", "file")


class FileProvider:
    """Evidence read from a JSON file (Evidence.to_json); for auditors and tests. Its binding is whatever was recorded."""

    name = "file"
    simulated = False

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None

    def unavailable_reason(self) -> str | None:
        if self.path is None:
            return "the file provider needs a path to an evidence JSON file"
        if not self.path.is_file():
            return f"evidence file {self.path} does not exist"
        return None

    def collect(self, report_data: bytes) -> Evidence:
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            return Evidence.from_json(json.loads(self.path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"evidence file {self.path} is not JSON: {exc.msg if hasattr(exc, 'msg') else exc}") from None


def get_provider(name: str, **options) -> EvidenceProvider:
    """The provider named `simulated`, `sev-snp`, `nvidia` or `file` (options: path=...)."""
    if name == "simulated":
        from medtee.attestation.simulated import SimulatedProvider

        return SimulatedProvider()
    if name == "sev-snp":
        from medtee.attestation.snp_guest import SnpProvider

        return SnpProvider(**options)
    if name == "nvidia":
        from medtee.attestation.nvml import NvmlProvider

        return NvmlProvider()
    if name == "file":
        return FileProvider(**options)
    raise ValueError(f"unknown evidence provider '{name}': use one of {', '.join(NAMES)}")


def unavailable_reasons(provider: str, gpu_provider: str | None) -> list[str]:
    """Why the policy's providers cannot run on this machine (empty when they can)."""
    names = [provider] + ([gpu_provider] if gpu_provider else [])
    return [f"{n}: {r}" for n in names if (r := get_provider(n).unavailable_reason())]


def collect_evidence(provider: str, gpu_provider: str | None, *, nonce: bytes, ephemeral_public_key: bytes,
                     recipe_digest: str, receipt_public_key: bytes | None = None) -> Evidence:
    """GPU evidence first (for the derived GPU nonce), then the CPU report over REPORT_DATA covering its digests;
    both bind `receipt_public_key` when given (the run's receipt-signing key)."""
    bound = dict(nonce=nonce, ephemeral_public_key=ephemeral_public_key, recipe_digest=recipe_digest,
                 receipt_public_key=receipt_public_key)
    gpus = get_provider(gpu_provider).collect_gpus(gpu_nonce(**bound)) if gpu_provider else ()
    binding = report_data(**bound, gpu_evidence_digests=[g.digest() for g in gpus])
    evidence = get_provider(provider).collect(binding)
    return dataclasses.replace(evidence, gpus=tuple(gpus))
