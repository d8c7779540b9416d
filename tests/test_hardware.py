"""What the machine can hold, read as the kernel accounts it: cgroup v2 and v1 memory limits on this process's cgroup
or any above it, with the reclaimable file cache counted as free."""

from __future__ import annotations

from medtee import hardware

GIB = 2**30


def _node(path, limit, usage, cache, *, v2=True):
    path.mkdir(parents=True, exist_ok=True)
    names = ("memory.max", "memory.current", "inactive_file") if v2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    (path / names[0]).write_text(f"{limit}\n")
    (path / names[1]).write_text(f"{usage}\n")
    (path / "memory.stat").write_text(f"anon 1\n{names[2]} {cache}\n")


def test_the_tightest_limit_up_the_tree_counts_and_cache_is_free(tmp_path):
    root = tmp_path / "v2"
    _node(root, "max", 0, 0)
    _node(root / "slurm", 64 * GIB, 54 * GIB, 50 * GIB)  # 4 GiB charged to processes, 50 GiB of cache
    _node(root / "slurm" / "job", "max", 54 * GIB, 50 * GIB)
    cgroups = (("0::", root, "memory.max", "memory.current", "inactive_file"),)
    assert hardware._cgroup_memory_left(["0::/slurm/job"], cgroups) == 60 * GIB
    _node(root / "slurm" / "job", 8 * GIB, 6 * GIB, 1 * GIB)
    assert hardware._cgroup_memory_left(["0::/slurm/job"], cgroups) == 3 * GIB


def test_cgroup_v1_and_no_limit(tmp_path):
    root = tmp_path / "memory"
    _node(root, 9223372036854771712, 5 * GIB, 0, v2=False)  # v1's "no limit"
    cgroups = (("memory:", root, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),)
    assert hardware._cgroup_memory_left(["4:memory:/docker/abc"], cgroups) is None
    _node(root, 16 * GIB, 5 * GIB, 2 * GIB, v2=False)  # a container sees its own cgroup at the mount's root
    assert hardware._cgroup_memory_left(["4:memory:/docker/abc"], cgroups) == 13 * GIB
    assert hardware._cgroup_memory_left(["0::/"], cgroups) is None
