"""What a hardware profile requires of the machine, checked against what the machine really is."""

from __future__ import annotations

import os
from pathlib import Path

CONFIGFS_TSM = Path("/sys/kernel/config/tsm/report")
SEV_GUEST = Path("/dev/sev-guest")


def sev_snp_guest_reason() -> str | None:
    """None when this is an SEV-SNP guest that can produce reports; else what is missing."""
    if CONFIGFS_TSM.is_dir() or SEV_GUEST.exists():
        return None
    return (f"this machine is not an SEV-SNP guest: neither {CONFIGFS_TSM} (configfs-tsm, Linux 6.7+) nor "
            f"{SEV_GUEST} exists")


def mismatches(profile) -> list[str]:
    """Every way this machine fails the hardware profile (empty when it satisfies it)."""
    problems = []
    if profile.require_sev_snp and (reason := sev_snp_guest_reason()):
        problems.append(reason)
    if profile.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(f"hardware profile '{profile.name}' needs CUDA GPUs and torch sees none")
        else:
            count = torch.cuda.device_count()
            if count < profile.devices:
                problems.append(f"hardware profile '{profile.name}' needs {profile.devices} GPUs; {count} visible")
            if profile.gpu_model:
                names = {torch.cuda.get_device_name(i) for i in range(count)}
                wrong = sorted(n for n in names if profile.gpu_model not in n)
                if wrong:
                    problems.append(f"hardware profile '{profile.name}' needs {profile.gpu_model} GPUs; found "
                                    f"{', '.join(wrong)}")
    if profile.cpu_threads:
        available = len(os.sched_getaffinity(0))
        if profile.cpu_threads > available:
            problems.append(f"hardware.cpu_threads={profile.cpu_threads} but only {available} CPUs are available")
    return problems
