"""Appraisal policies: the schema of the `attestation` config group and its YAML files in conf/attestation/."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from medtee.paths import conf_dir



class Provider(str, Enum):
    """CPU evidence providers. YAML names the member (`sev_snp`); evidence and the wire carry the value."""

    simulated = "simulated"  # development only: no TEE, protects nothing
    sev_snp = "sev-snp"  # the SEV-SNP guest's own report (configfs-tsm or /dev/sev-guest)
    file = "file"  # evidence read from a file (verification of recorded evidence)


class GpuProvider(str, Enum):
    """GPU evidence providers."""

    nvidia = "nvidia"  # NVIDIA confidential-computing GPUs through NVML


class Revocation(str, Enum):
    """What to do when certificate revocation (OCSP) cannot be established."""

    fail_closed = "fail_closed"  # no fresh revocation answer (online or cached) -> reject
    fail_open = "fail_open"  # no answer -> accept; a "revoked" answer still rejects
    off = "off"  # do not check revocation


@dataclass
class MinimumTcb:
    """Minimum SVN per TCB component; compared component by component against REPORTED_TCB."""

    bootloader: int = 0  # minimum bootloader SPL
    tee: int = 0  # minimum PSP OS (TEE) SPL
    snp: int = 0  # minimum SNP firmware SPL
    microcode: int = 0  # minimum CPU microcode SPL
    fmc: int = 0  # minimum FMC SPL (Turin only; ignored on Milan/Genoa)


@dataclass
class GpuPolicy:
    """Requirements on each NVIDIA GPU's evidence (used when `gpu_provider` is set or GPU evidence is present)."""

    required: bool = False  # reject CPU evidence that comes without any GPU evidence
    require_cc_mode: bool = True  # NVML must report confidential computing on
    forbid_devtools: bool = True  # NVML must report developer-tools mode off (devtools has no memory protection)
    min_driver_version: str = "0"  # minimum driver version, dotted (e.g. "550.90.07")
    min_vbios_version: str = "0"  # minimum VBIOS version, dotted hex pairs as reported (e.g. "96.00.9F.00.01")
    rim_store: Optional[str] = None  # directory of signed RIMs (*.swidtag) and the pinned RIM root (rim_root.pem)
    require_rim_match: bool = False  # every active measurement of the store's RIMs must equal one of its alternatives
    allowed_rim_ids: List[str] = field(default_factory=list)  # RIM SoftwareIdentity tagIds allowed; empty = any signed
    revocation: Revocation = Revocation.off  # OCSP stance for the GPU certificate chain
    ocsp_cache: Optional[str] = None  # directory of cached DER OCSP responses, <serial hex>.der (never fetched)


@dataclass
class AttestationPolicy:
    """An appraisal policy (also the Hydra schema of the `attestation` group). Empty lists mean "any"."""

    name: str = "simulated"  # policy name (file stem in conf/attestation/)
    provider: Provider = Provider.simulated  # CPU evidence provider a run uses: simulated | sev_snp | file
    gpu_provider: Optional[GpuProvider] = None  # GPU evidence provider a run uses: nvidia, or null for none
    production: bool = False  # production policies refuse simulated evidence and must bind REPORT_DATA
    allow_simulated: bool = False  # accept SIMULATED evidence (development only; protects nothing)
    authenticity_only: bool = False  # check only genuineness (chain, signature, TCB, reserved fields, binding)
    require_binding: bool = True  # reject when the verifier has no expected REPORT_DATA to compare
    report_versions: List[int] = field(default_factory=lambda: [2, 3, 5])  # accepted report VERSION values
    products: List[str] = field(default_factory=list)  # accepted AMD products (Milan, Genoa, Turin)
    signing_keys: List[str] = field(default_factory=lambda: ["vcek", "vlek"])  # accepted signing keys
    measurements: List[str] = field(default_factory=list)  # allowed launch MEASUREMENTs (96 hex chars each)
    host_data: Optional[str] = None  # required HOST_DATA (64 hex chars)
    vmpl: Optional[int] = None  # required VMPL (0 = most privileged); null = any
    min_tcb: MinimumTcb = field(default_factory=MinimumTcb)  # minimum REPORTED_TCB per component
    min_firmware: str = "0.0.0"  # minimum current SNP firmware major.minor.build
    min_guest_svn: int = 0  # minimum GUEST_SVN
    allow_debug: bool = False  # accept POLICY.DEBUG=1 (the hypervisor can read guest memory)
    allow_migrate_ma: bool = False  # accept POLICY.MIGRATE_MA=1 (a migration agent may export the guest)
    allow_smt: bool = True  # accept POLICY.SMT=1 (guest may run with simultaneous multithreading)
    require_single_socket: bool = False  # require POLICY.SINGLE_SOCKET=1
    cert_cache_dir: Optional[str] = None  # directory of cached VCEKs/VLEKs (see amd.CertCache)
    fetch_certificates: bool = False  # fetch missing VCEKs from AMD's KDS (off for offline recipes)
    gpu: GpuPolicy = field(default_factory=GpuPolicy)  # GPU requirements

    def problems(self) -> list[str]:
        """Inconsistencies, each naming the field and the fix (empty when the policy is usable)."""
        out = []
        if self.production and self.allow_simulated:
            out.append("production policies must set allow_simulated: false")
        if self.production and self.provider == Provider.simulated:
            out.append("production policies need provider sev_snp (or file), not simulated")
        if self.production and not self.require_binding:
            out.append("production policies must set require_binding: true")
        if self.production and self.authenticity_only:
            out.append("a production policy cannot be authenticity_only")
        for m in self.measurements:
            if not re.fullmatch(r"[0-9a-fA-F]{96}", m):
                out.append(f"measurements: '{m}' is not 96 hex characters (48 bytes)")
        if self.host_data is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.host_data):
            out.append("host_data must be 64 hex characters (32 bytes)")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.min_firmware):
            out.append(f"min_firmware '{self.min_firmware}' must look like MAJOR.MINOR.BUILD")
        bad_keys = set(self.signing_keys) - {"vcek", "vlek"}
        if bad_keys or not self.signing_keys:
            out.append("signing_keys must be a non-empty subset of [vcek, vlek]")
        bad_products = set(self.products) - {"Milan", "Genoa", "Turin"}
        if bad_products:
            out.append(f"products: unknown {sorted(bad_products)}; use Milan, Genoa, Turin")
        if (self.gpu.require_rim_match or self.gpu.allowed_rim_ids) and not self.gpu.rim_store:
            out.append("gpu.require_rim_match / allowed_rim_ids need gpu.rim_store: the directory of signed RIMs")
        if (self.gpu.allowed_rim_ids or self.gpu.rim_store) and not self.gpu.require_rim_match:
            out.append("gpu.rim_store / allowed_rim_ids are used only with gpu.require_rim_match: true; set it or "
                       "leave them unset")
        if self.gpu.ocsp_cache and self.gpu.revocation is Revocation.off:
            out.append("gpu.ocsp_cache is set but gpu.revocation is off: set fail_open or fail_closed, or unset it")
        return out


def policy_from_mapping(data: object, source: str) -> AttestationPolicy:
    """Validate a mapping (a YAML file or a composed config group) against the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(data, Mapping) and data.get("provider") == Provider.sev_snp.value:
        data = {**data, "provider": Provider.sev_snp.name}  # policy files written before providers were an enum
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AttestationPolicy), data)
        policy = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ValueError(f"attestation policy {source}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    problems = policy.problems()
    if problems:
        raise ValueError(f"attestation policy {source}: " + "; ".join(problems))
    return policy


def policy_document(data: bytes, source: str):
    """The mapping of a policy file's bytes (an OmegaConf DictConfig), validated against the schema; ValueError
    naming `source` and the problem."""
    import io

    import yaml
    from omegaconf import DictConfig, OmegaConf

    try:
        doc = OmegaConf.load(io.BytesIO(data))
    except (yaml.YAMLError, OSError) as e:  # OSError: a document that is a bare scalar
        raise ValueError(f"attestation policy {source}: not a YAML mapping ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, DictConfig):
        raise ValueError(f"attestation policy {source}: is a YAML list; write a mapping of policy fields")
    policy_from_mapping(doc, source)
    return doc


def load_policy(name: str) -> AttestationPolicy:
    """Read and validate conf/attestation/<name>.yaml."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name or ""):
        raise ValueError(f"attestation policy name '{name}' must be a file stem of conf/attestation/ (letters, digits, _ -)")
    path = conf_dir() / "attestation" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir() / "attestation").glob("*.yaml"))
        raise ValueError(f"no attestation policy '{name}' ({path}); known: {', '.join(known)}")
    from omegaconf import OmegaConf

    return policy_from_mapping(OmegaConf.load(path), str(path))
