"""The `hardware` config group: its schema, and what a profile requires of the machine, checked against what the
machine really is."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from medtee.schema import below_minimums


class Accelerator(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class HardwareConfig:
    name: str = "cpu_dev"  # profile name, recorded in the run's tags
    production: bool = False  # a production profile: real attestation only, sealed data only, remote key broker
    accelerator: Accelerator = Accelerator.cpu  # what the training runs on
    devices: int = 1  # accelerators per node
    num_nodes: int = 1  # nodes (multi-node runs go through Lightning's launchers)
    gpu_model: Optional[str] = None  # required GPU product name substring, e.g. "H200"; checked before key release
    require_sev_snp: bool = False  # the machine must be an SEV-SNP guest (configfs-tsm or /dev/sev-guest)
    require_gpu_cc: bool = False  # every GPU must be in CC mode: the attestation policy must demand it of GPU evidence
    supports_4bit: bool = True  # bitsandbytes 4-bit kernels run on this profile
    cpu_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default

    def problems(self) -> list[str]:
        """What no machine could run (`HardwareConfig.problems(cfg.hardware)` on a composed group too)."""
        return below_minimums(self, "hardware", {"devices": 1, "num_nodes": 1, "cpu_threads": 1})

CONFIGFS_TSM = Path("/sys/kernel/config/tsm/report")
SEV_GUEST = Path("/dev/sev-guest")


def sev_snp_guest_reason() -> str | None:
    """None when this is an SEV-SNP guest that can produce reports; else what is missing."""
    if CONFIGFS_TSM.is_dir() or SEV_GUEST.exists():
        return None
    return (f"this machine is not an SEV-SNP guest: neither {CONFIGFS_TSM} (configfs-tsm, Linux 6.7+) nor "
            f"{SEV_GUEST} exists")


PROC_SWAPS = Path("/proc/swaps")


def active_swap(swaps: Path | None = None) -> list[str] | None:
    """The swap areas in use that lie outside this machine's memory (/proc/swaps, less zram devices, which are
    compressed RAM); None when /proc/swaps cannot be read."""
    try:
        lines = (swaps or PROC_SWAPS).read_text().splitlines()[1:]  # under the header line
    except OSError:
        return None
    areas = [line.split()[0] for line in lines if line.strip()]
    return [a for a in areas if not re.fullmatch(r"/dev/zram\d+", a)]  # a swap *file* named zram* is on a disk


def swap_problem(profile) -> str | None:
    """Why a production profile cannot run with this machine's swap: decrypted records, keys and the in-memory
    temporary directory (tmpfs) could be paged out to a disk outside the TEE's encrypted memory. Development
    profiles are not checked."""
    if not profile.production:
        return None
    areas = active_swap()
    if areas is None:
        return (f"hardware profile '{profile.name}' is a production profile and {PROC_SWAPS} cannot be read, so "
                f"swap cannot be ruled out")
    if areas:
        return (f"hardware profile '{profile.name}' is a production profile and swap is on ({', '.join(areas)}): "
                f"decrypted records and keys could be paged out to it; turn it off (swapoff -a) or run on medtee's "
                f"image, which has none")
    return None


def launcher_problem(profile) -> str | None:
    """Why this process cannot be one of the profile's `devices x num_nodes` processes: medtee starts none itself
    (each process attests and obtains the data key on its own), so torchrun or srun starts one per device, as many as
    the profile names. Read as Lightning reads it."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    world = profile.devices * profile.num_nodes
    named = f"hardware.devices={profile.devices} x hardware.num_nodes={profile.num_nodes}"
    if TorchElasticEnvironment.detect():
        started, launcher = os.environ.get("WORLD_SIZE", "?"), "torchrun"
    elif SLURMEnvironment.detect():
        started, launcher = os.environ["SLURM_NTASKS"], "srun"
    elif world == 1:
        return None
    else:
        several = profile.num_nodes > 1
        nodes = f" --nnodes {profile.num_nodes} --node_rank R --master_addr HOST" if several else ""
        return (f"{named} needs {world} processes, one per device, started by torchrun or srun; this one was started "
                f"alone: run `torchrun{nodes} --nproc_per_node {profile.devices} -m medtee train ...`"
                f"{' on each node' if several else ''} or `srun{f' --nodes {profile.num_nodes}' if several else ''} "
                f"--ntasks-per-node {profile.devices} python -m medtee train ...`, or set hardware.devices=1 and "
                f"hardware.num_nodes=1")
    if started != str(world):
        return (f"{launcher} started {started} processes and {named} names {world}: make them agree")
    return None


def mismatches(profile) -> list[str]:
    """Every way this machine fails the hardware profile (empty when it satisfies it)."""
    problems = []
    if reason := launcher_problem(profile):
        problems.append(reason)
    if profile.require_sev_snp and (reason := sev_snp_guest_reason()):
        problems.append(reason)
    if reason := swap_problem(profile):
        problems.append(reason)
    if profile.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            fix = "" if profile.production else " (on a machine without one, use hardware=cpu_dev)"
            problems.append(f"hardware profile '{profile.name}' needs CUDA GPUs and torch sees none: run it where "
                            f"torch.cuda.is_available() is true (an NVIDIA GPU and a CUDA build of torch){fix}")
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


def free_gpu_memory() -> int | None:
    """Bytes free on this process's GPU (torchrun's LOCAL_RANK, srun's SLURM_LOCALID); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))[0]


def free_host_memory() -> int | None:
    """Bytes the host can still give this process: MemAvailable (the page cache the kernel would give back
    included), or less under a cgroup v2 memory limit on this process's cgroup or any above it; None when unknown."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    left = _cgroup_memory_left()
    return left if free is None else free if left is None else min(free, left)


CGROUP_ROOT = Path("/sys/fs/cgroup")
#: (line prefix in /proc/self/cgroup, mount, limit, usage, reclaimable cache key in memory.stat): cgroup v2, then v1
_CGROUPS = (("0::", CGROUP_ROOT, "memory.max", "memory.current", "inactive_file"),
            ("memory:", CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file"))


def _cgroup_memory_left(lines: list[str] | None = None, cgroups=_CGROUPS) -> int | None:
    """The least memory left under any memory limit from this process's cgroup (`lines` of /proc/self/cgroup) up to
    its hierarchy's root (v2 or v1): the limit, less what is charged, plus the reclaimable file cache; None without
    a limit."""
    if lines is None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
    left = None
    for prefix, root, limit_file, usage_file, cache_key in cgroups:
        own = next((x for x in lines if x.startswith(prefix) or f":{prefix}" in x), None)
        if own is None:
            continue
        node = root / own.split(":", 2)[2].strip().lstrip("/")
        while True:
            try:
                limit = (node / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 2**62:  # v1 writes "no limit" as a huge number
                    stat = dict(x.split() for x in (node / "memory.stat").read_text().splitlines() if " " in x)
                    here = int(limit) - int((node / usage_file).read_text()) + int(stat.get(cache_key, 0))
                    left = here if left is None else min(left, here)
            except (OSError, ValueError):
                pass
            if node == root or root not in node.parents:
                break
            node = node.parent
    return left
