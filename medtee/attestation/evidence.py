"""Evidence as collected in the TEE and carried to the key broker: the CPU report, certificates, GPU evidence."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class EvidenceFormatError(ValueError):
    """Evidence content that cannot be parsed (a report, certificate, SPDM exchange, RIM, certificate table or evidence
    JSON). The message names the part, its position and the problem (at most an exception type), never its bytes."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise EvidenceFormatError(f"evidence JSON: '{where}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise EvidenceFormatError(f"evidence JSON: '{where}' is not valid base64") from None


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class GpuEvidence:
    """One GPU's evidence: the SPDM GET_MEASUREMENTS request||response and its certificate chain (leaf first, DER).

    `cc_feature` and `devtools_mode` are the confidential-computing state NVML reported inside the TEE (None when not
    reported, e.g. evidence read from files); they are trusted only as far as the CPU evidence proves the measured image.
    """

    report: bytes
    certificates: tuple[bytes, ...]
    cc_feature: bool | None = None
    devtools_mode: bool | None = None

    def to_json(self) -> dict:
        """JSON form: binary values in base64."""
        return {
            "report": _b64(self.report),
            "certificates": [_b64(c) for c in self.certificates],
            "cc_feature": self.cc_feature,
            "devtools_mode": self.devtools_mode,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "gpus[]") -> GpuEvidence:
        """Inverse of to_json; raises EvidenceFormatError naming the bad field."""
        if not isinstance(d, dict):
            raise EvidenceFormatError(f"evidence JSON: '{where}' must be an object")
        certs = d.get("certificates", [])
        if not isinstance(certs, list):
            raise EvidenceFormatError(f"evidence JSON: '{where}.certificates' must be a list")
        flags = {}
        for key in ("cc_feature", "devtools_mode"):
            value = d.get(key)
            if value is not None and not isinstance(value, bool):
                raise EvidenceFormatError(f"evidence JSON: '{where}.{key}' must be true, false or null")
            flags[key] = value
        return cls(
            report=_unb64(d.get("report"), f"{where}.report"),
            certificates=tuple(_unb64(c, f"{where}.certificates[{i}]") for i, c in enumerate(certs)),
            **flags,
        )

    def digest(self) -> bytes:
        """SHA-384 of the canonical JSON form; folded into REPORT_DATA (see binding.report_data)."""
        return hashlib.sha384(_canonical(self.to_json())).digest()


@dataclass(frozen=True)
class Evidence:
    """A CPU attestation report (raw 1184-byte SEV-SNP layout) with certificates (DER), plus optional GPU evidence.

    `certificates` holds the VCEK/VLEK (and any ASK/ASVK/ARK that came with it; those must equal the pinned ones),
    or, for simulated evidence, the self-signed development certificate.
    """

    provider: str
    snp_report: bytes
    certificates: tuple[bytes, ...] = ()
    gpus: tuple[GpuEvidence, ...] = ()
    simulated: bool = False

    def gpu_evidence_digests(self) -> tuple[bytes, ...]:
        """The digests a REPORT_DATA binding must cover, in GPU order."""
        return tuple(g.digest() for g in self.gpus)

    def to_json(self) -> dict:
        """JSON form for the HTTP broker: binary values in base64."""
        return {
            "provider": self.provider,
            "simulated": self.simulated,
            "snp_report": _b64(self.snp_report),
            "certificates": [_b64(c) for c in self.certificates],
            "gpus": [g.to_json() for g in self.gpus],
        }

    @classmethod
    def from_json(cls, d: dict) -> Evidence:
        """Inverse of to_json; raises EvidenceFormatError naming the bad field."""
        if not isinstance(d, dict):
            raise EvidenceFormatError("evidence JSON: top level must be an object")
        provider, simulated = d.get("provider"), d.get("simulated", False)
        if not isinstance(provider, str) or not provider:
            raise EvidenceFormatError("evidence JSON: 'provider' must be a non-empty string")
        if not isinstance(simulated, bool):
            raise EvidenceFormatError("evidence JSON: 'simulated' must be true or false")
        certs, gpus = d.get("certificates", []), d.get("gpus", [])
        if not isinstance(certs, list) or not isinstance(gpus, list):
            raise EvidenceFormatError("evidence JSON: 'certificates' and 'gpus' must be lists")
        return cls(
            provider=provider,
            snp_report=_unb64(d.get("snp_report"), "snp_report"),
            certificates=tuple(_unb64(c, f"certificates[{i}]") for i, c in enumerate(certs)),
            gpus=tuple(GpuEvidence.from_json(g, f"gpus[{i}]") for i, g in enumerate(gpus)),
            simulated=simulated,
        )

    def digest(self) -> str:
        """`sha256:<hex>` of the canonical JSON form (for receipts and audit logs)."""
        return "sha256:" + hashlib.sha256(_canonical(self.to_json())).hexdigest()


@runtime_checkable
class EvidenceProvider(Protocol):
    """Something that collects evidence bound to a REPORT_DATA value."""

    name: str
    simulated: bool

    def unavailable_reason(self) -> str | None:
        """None when usable; otherwise exactly what is missing (device, CC mode, driver...)."""

    def collect(self, report_data: bytes) -> Evidence:
        """Collect evidence whose CPU report carries `report_data` (64 bytes)."""

