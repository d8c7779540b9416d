"""Swap on a production profile is a preflight problem (medtee.hardware.swap_problem): decrypted records, keys and
the in-memory temporary directory could be paged out to a disk outside the TEE's encrypted memory."""

from __future__ import annotations

import pytest

from medtee import hardware
from medtee.hardware import HardwareConfig

HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
PRODUCTION = HardwareConfig(name="snp_prod", production=True)
DEVELOPMENT = HardwareConfig(name="cpu_dev")


@pytest.fixture
def swaps(tmp_path, monkeypatch):
    path = tmp_path / "swaps"
    monkeypatch.setattr(hardware, "PROC_SWAPS", path)
    return path


def test_a_production_profile_refuses_active_swap(swaps):
    swaps.write_text(HEADER + "/swapfile                               file\t\t8388604\t\t0\t\t-2\n")
    [problem] = hardware.mismatches(PRODUCTION)
    assert "swap is on (/swapfile)" in problem and "snp_prod" in problem


def test_no_swap_or_only_zram_is_no_problem(swaps):
    swaps.write_text(HEADER)
    assert hardware.mismatches(PRODUCTION) == []
    swaps.write_text(HEADER + "/dev/zram0                              partition\t4194300\t\t0\t\t100\n")
    assert hardware.mismatches(PRODUCTION) == []


def test_unreadable_swaps_fail_closed_in_production_only(swaps):
    assert not swaps.exists()
    [problem] = hardware.mismatches(PRODUCTION)
    assert "cannot be read" in problem
    assert hardware.mismatches(DEVELOPMENT) == []


def test_a_development_profile_does_not_check_swap(swaps):
    swaps.write_text(HEADER + "/dev/sda2                               partition\t8388604\t\t0\t\t-2\n")
    assert hardware.mismatches(DEVELOPMENT) == []


def test_this_machine_reads_its_swaps():
    assert hardware.active_swap() is not None  # Linux: /proc/swaps exists (empty or not)


def test_a_swap_file_named_like_zram_is_swap_on_a_disk(swaps):
    swaps.write_text(HEADER + "/var/zramswap                           file\t\t4194300\t\t0\t\t-2\n")
    [problem] = hardware.mismatches(PRODUCTION)
    assert "swap is on (/var/zramswap)" in problem
