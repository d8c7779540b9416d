"""Expected SEV-SNP launch measurements of a confidential VM image, and pinning them in a release policy.

The image boots directly (QEMU `-kernel/-initrd/-append` with `kernel-hashes=on`): the SNP firmware measures the
OVMF pages, the SEV hashes table holding SHA-256 of the kernel, the initrd and the command line, OVMF's metadata
pages and one VMSA per vCPU. sev-snp-measure (`sevsnpmeasure`) computes that digest; this module checks the inputs
first, so a bad one is refused before anything is hashed, and maps sev-snp-measure's refusals to ValueError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medtee.attestation.policy import policy_document

VMM_TYPES = {"qemu": "QEMU", "ec2": "ec2", "gce": "gce"}  # medtee's name -> sevsnpmeasure.vmm_types.VMMType member
MAX_POLICY_BYTES = 64 << 10  # of a policy file --into accepts (as the broker's store)
MAX_VCPUS = 4096  # KVM_MAX_VCPUS on x86 (Linux 6.x); more would only make the measurement loop long
_HEX96 = re.compile(r"[0-9a-fA-F]{96}")
_FLOW_MEASUREMENTS = re.compile(r"(?m)^measurements:[ \t]*\[[^\]\n#]*\][ \t]*(#.*)?$")


@dataclass(frozen=True)
class Image:
    """What decides the launch measurement of a direct-boot SEV-SNP guest."""

    ovmf: Path  # OVMF firmware with an SNP kernel-hashes section (edk2 OvmfPkg/AmdSev/AmdSevX64.dsc)
    kernel: Path
    initrd: Path
    append: str  # the kernel command line exactly as the VMM passes it
    vcpus: int
    vcpu_type: str | None  # QEMU -cpu model (sevsnpmeasure.vcpu_types.CPU_SIGS); ec2 and gce do not use it
    guest_features: int = 0x1  # SEV_FEATURES of the VMSAs (0x1: SNP active)
    vmm_type: str = "qemu"  # qemu | ec2 | gce
    ovmf_hash: str | None = None  # SNP hash of the OVMF pages computed earlier (sev-snp-measure snp:ovmf-hash)


def check_image(image: Image) -> None:
    """ValueError naming the first unusable input and the fix; reads the OVMF footer table, hashes nothing."""
    from sevsnpmeasure.vcpu_types import CPU_SIGS

    for flag, path in (("--ovmf", image.ovmf), ("--kernel", image.kernel), ("--initrd", image.initrd)):
        if not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file (or not a regular file)")
    if image.vcpus < 1:
        raise ValueError(f"--vcpus must be at least 1 (got {image.vcpus})")
    if image.vcpus > MAX_VCPUS:
        raise ValueError(f"--vcpus must be at most {MAX_VCPUS} (got {image.vcpus}), KVM's limit on x86")
    if image.vmm_type not in VMM_TYPES:
        raise ValueError(f"--vmm-type '{image.vmm_type}' is unknown: use one of {', '.join(VMM_TYPES)}")
    if image.vcpu_type is None and image.vmm_type == "qemu":
        raise ValueError("--vcpu-type is needed with --vmm-type qemu: the QEMU -cpu model, e.g. EPYC-v4")
    if image.vcpu_type is not None and image.vcpu_type not in CPU_SIGS:
        raise ValueError(f"--vcpu-type '{image.vcpu_type}' is unknown: use one of {', '.join(CPU_SIGS)}")
    if not 0 <= image.guest_features < 1 << 64:
        raise ValueError(f"--guest-features {image.guest_features:#x} does not fit SEV_FEATURES (64 bits)")
    if image.ovmf_hash is not None and not _HEX96.fullmatch(image.ovmf_hash):
        raise ValueError("--snp-ovmf-hash must be 96 hex characters (the 48-byte SHA-384 digest)")
    _check_ovmf(Path(image.ovmf))


def _check_ovmf(path: Path) -> None:
    """The OVMF build supports SNP direct boot with kernel hashes, as its footer table declares."""
    from sevsnpmeasure.ovmf import OVMF, SectionType

    try:
        ovmf = OVMF(str(path))
        ovmf.sev_es_reset_eip()
        sections = [s.section_type() for s in ovmf.metadata_items()]
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--ovmf {path}: not an SEV-SNP OVMF build ({e}); use an edk2 AmdSevX64 build") from None
    if SectionType.SNP_KERNEL_HASHES not in sections:
        raise ValueError(f"--ovmf {path}: this OVMF has no SNP kernel-hashes section, so it cannot measure the kernel, "
                         "initrd and command line; build edk2 OvmfPkg/AmdSev/AmdSevX64.dsc")


def launch_measurement(image: Image) -> str:
    """The expected MEASUREMENT (96 hex characters) of `image`, after `check_image`."""
    from sevsnpmeasure import guest
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType

    check_image(image)
    signature = CPU_SIGS[image.vcpu_type] if image.vcpu_type else 0  # ec2 and gce set their own
    try:
        digest = guest.calc_launch_digest(
            SevMode.SEV_SNP, image.vcpus, signature, str(image.ovmf), str(image.kernel), str(image.initrd),
            image.append, image.guest_features, image.ovmf_hash or "", VMMType[VMM_TYPES[image.vmm_type]])
    except (RuntimeError, ValueError, AssertionError) as e:  # sev-snp-measure's refusals of a malformed OVMF
        raise ValueError(f"--ovmf {image.ovmf}: sev-snp-measure cannot measure it ({e or type(e).__name__})") from None
    return digest.hex()


def read_policy_file(path: Path) -> tuple[str, object]:
    """The text of the policy file `path` and its validated mapping; ValueError naming the file and the problem."""
    from medtee.files import read_regular

    try:
        data = read_regular(path, MAX_POLICY_BYTES)
    except FileNotFoundError:
        raise ValueError(f"--into {path}: no such policy file; start from a shipped one: "
                         f"medtee broker policy show snp_h200 > {path}") from None
    except ValueError as e:  # NotRegularFile
        raise ValueError(f"--into {path} {e}; give a policy YAML file") from None
    except OSError as e:
        raise ValueError(f"--into {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8"), policy_document(data, str(path))
    except UnicodeDecodeError:
        raise ValueError(f"--into {path}: not UTF-8 text; give a policy YAML file") from None


def _with_measurements(text: str, doc, measurements: list[str]) -> str:
    """`text` with its top-level `measurements` set: its one flow-style line replaced, or a line added, so comments
    stay; a list written otherwise means re-serialising the whole document."""
    line = f"measurements: [{', '.join(json.dumps(m) for m in measurements)}]"
    if "measurements" not in doc:
        return text + ("\n" if text and not text.endswith("\n") else "") + line + "\n"
    new, count = _FLOW_MEASUREMENTS.subn(lambda found: line + (f"  {found[1]}" if found[1] else ""), text)
    if count == 1:
        return new
    from omegaconf import OmegaConf

    doc.measurements = measurements
    return OmegaConf.to_yaml(doc)


def pin_measurement(path: Path, measurement: str) -> bool:
    """Add `measurement` to the allowed `measurements` of the policy file `path` (the list is created if missing,
    existing entries kept, no duplicates); the result must load as a valid policy; atomic. False if it was there."""
    from medtee.files import write_atomic

    text, doc = read_policy_file(path)
    pinned = [str(m) for m in (doc.get("measurements") or [])]
    if measurement.lower() in (m.lower() for m in pinned):
        return False
    wanted = pinned + [measurement]
    new_text = _with_measurements(text, doc, wanted)
    if list(policy_document(new_text.encode(), str(path)).get("measurements")) != wanted:
        raise ValueError(f"--into {path}: could not update its measurements list in place; add {measurement} by hand")
    write_atomic(path, new_text.encode(), mode=path.stat().st_mode & 0o777)
    return True
