"""Attestation: evidence providers, SEV-SNP and NVIDIA verification, REPORT_DATA binding, appraisal policies.

Light to import (cryptography only); omegaconf, NVML and XML libraries load when used.
"""

from medtee.attestation.appraise import appraise
from medtee.attestation.binding import gpu_nonce, report_data
from medtee.attestation.evidence import Evidence, EvidenceProvider, GpuEvidence
from medtee.attestation.policy import AttestationPolicy, GpuPolicy, MinimumTcb, Revocation, load_policy, policy_from_mapping
from medtee.attestation.providers import collect_evidence, get_provider, unavailable_reasons
from medtee.attestation.verdict import Check, Verdict

__all__ = [
    "AttestationPolicy", "Check", "Evidence", "EvidenceProvider", "GpuEvidence", "GpuPolicy", "MinimumTcb",
    "Revocation", "Verdict", "appraise", "collect_evidence", "get_provider", "gpu_nonce", "load_policy",
    "policy_from_mapping", "report_data", "unavailable_reasons",
]
