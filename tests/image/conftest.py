"""Fixtures of the image tests: a synthetic OVMF image and tiny kernel/initrd files (no downloaded firmware).

The OVMF image is 4 KiB whose GUIDed footer table (ending 32 bytes before the end of the image; layout documented in
edk2 OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm and parsed by sevsnpmeasure/ovmf.py) declares what
sev-snp-measure reads from a real build: the SEV-ES reset vector, the SEV hashes table and the SNP metadata
("ASEV") sections. Its bytes are synthetic; only the addresses below are those of a real build.
"""

from __future__ import annotations

import struct
import uuid

import pytest

FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
HASH_TABLE_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
SEC_MEM, SECRETS, CPUID, SVSM_CAA, KERNEL_HASHES = 1, 2, 3, 4, 0x10

# The addresses an edk2-stable202405 OvmfPkg/AmdSev/AmdSevX64 build declares, as read from the footer table of
# sev-snp-measure's fixture tests/fixtures/ovmf_AmdSev_suffix.bin: (gpa, size, type) of each SNP metadata section.
AMDSEV_SECTIONS = ((0x800000, 0x9000, SEC_MEM), (0x80A000, 0x3000, SEC_MEM), (0x80D000, 0x1000, SECRETS),
                   (0x80E000, 0x1000, CPUID), (0x80F000, 0x1000, SVSM_CAA), (0x810000, 0x1000, KERNEL_HASHES),
                   (0x811000, 0xF000, SEC_MEM))
AMDSEV_RESET_EIP = 0x80B004  # the SEV-ES AP reset vector
AMDSEV_HASH_TABLE = (0x810C00, 0x400)  # GPA and size of the SEV hashes table (kernel-hashes=on)


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def ovmf_bytes(sections=AMDSEV_SECTIONS, reset_eip: int = AMDSEV_RESET_EIP, hash_table=AMDSEV_HASH_TABLE,
               *, size: int = 4096, filler: int = 0xCC) -> bytes:
    """An OVMF image of `size` bytes: filler, the SNP metadata ("ASEV") block, then the footer table ending 32 bytes
    before the end of the image, as in an edk2 build."""
    metadata = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    metadata += b"".join(struct.pack("<III", *s) for s in sections)
    metadata_at = 1024  # offset of the "ASEV" block in the image
    table = _entry(RESET_BLOCK_GUID, struct.pack("<I", reset_eip))
    if hash_table is not None:
        table += _entry(HASH_TABLE_GUID, struct.pack("<II", *hash_table))
    table += _entry(METADATA_GUID, struct.pack("<I", size - metadata_at))
    table += struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER_GUID).bytes_le
    image = bytearray([filler]) * size
    image[metadata_at:metadata_at + len(metadata)] = metadata
    image[size - 32 - len(table):size - 32] = table
    return bytes(image)


@pytest.fixture
def image(tmp_path):
    """Paths of an AmdSevX64-like OVMF, an empty kernel and an empty initrd (the upstream tests' /dev/null)."""
    (tmp_path / "OVMF.fd").write_bytes(ovmf_bytes())
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"")
    return {"ovmf": tmp_path / "OVMF.fd", "kernel": tmp_path / "vmlinuz", "initrd": tmp_path / "initrd.img"}
