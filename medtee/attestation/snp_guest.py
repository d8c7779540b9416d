"""SEV-SNP evidence from inside the guest: Linux configfs-tsm, falling back to /dev/sev-guest (SNP_GET_EXT_REPORT)."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from medtee.attestation.amd import parse_cert_table
from medtee.attestation.evidence import Evidence
from medtee.attestation.snp import REPORT_SIZE

CONFIGFS_TSM = Path("/sys/kernel/config/tsm/report")
SEV_GUEST = Path("/dev/sev-guest")

# <linux/sev-guest.h>
SNP_GUEST_REQ_IOCTL_SIZE = 32  # struct snp_guest_request_ioctl {u8 msg_version; u64 req_data, resp_data, exitinfo2}
SNP_EXT_REPORT_REQ = struct.Struct("<64sI28xQI4x")  # {snp_report_req {user_data[64], vmpl, rsvd[28]}, certs_address, certs_len}
SNP_RESP_SIZE = 4000  # {status u32, report_size u32, reserved[24], report[1184], ...}
SNP_GUEST_VMM_ERR_INVALID_LEN = 1
SNP_GUEST_VMM_ERR_BUSY = 2


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


SNP_GET_EXT_REPORT = _iowr("S", 2, SNP_GUEST_REQ_IOCTL_SIZE)


def certificates_from_table(blob: bytes) -> tuple[bytes, ...]:
    """VCEK/VLEK first, then ASK/ASVK and ARK, from an extended-report certificate table (may be empty)."""
    if not blob or not any(blob):
        return ()
    table = parse_cert_table(blob)
    return tuple(table[k] for k in ("vcek", "vlek", "ask", "ark") if k in table)


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != 64:
        raise ValueError(f"REPORT_DATA must be exactly 64 bytes; got {len(report_data)}")


class ConfigfsTsmProvider:
    """configfs-tsm (Linux 6.7+): one directory per request; `generation` detects a concurrent writer."""

    name = "sev-snp"
    simulated = False

    def __init__(self, root: str | Path = CONFIGFS_TSM, privlevel: int | None = None):
        self.root = Path(root)
        self.privlevel = privlevel

    def unavailable_reason(self) -> str | None:
        if not self.root.is_dir():
            return (f"{self.root} is missing: not an SEV-SNP guest, or the kernel lacks configfs-tsm (Linux 6.7+, "
                    "CONFIG_TSM_REPORTS) or configfs is not mounted")
        if not os.access(self.root, os.W_OK):
            return f"{self.root} is not writable by this user (run as root or grant access to configfs-tsm)"
        return None

    def collect(self, report_data: bytes) -> Evidence:
        _check_report_data(report_data)
        entry = self.root / f"medtee-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        entry.mkdir()
        try:
            before = int((entry / "generation").read_text().strip())
            writes = 0
            if self.privlevel is not None:
                (entry / "privlevel").write_text(str(self.privlevel))
                writes += 1
            (entry / "inblob").write_bytes(report_data)
            writes += 1
            provider = (entry / "provider").read_text().strip()
            outblob = (entry / "outblob").read_bytes()
            auxblob = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
            after = int((entry / "generation").read_text().strip())
        finally:
            entry.rmdir()
        if after != before + writes:
            raise RuntimeError(f"configfs-tsm: another writer changed {entry.name} during collection "
                               f"(generation {before} -> {after}, expected {before + writes}); retry")
        if provider != "sev_guest":
            raise RuntimeError(f"configfs-tsm provider is '{provider}', not 'sev_guest': this is not an SEV-SNP guest")
        if len(outblob) != REPORT_SIZE:
            raise RuntimeError(f"configfs-tsm returned {len(outblob)} bytes; an SEV-SNP report is {REPORT_SIZE}")
        return Evidence(provider=self.name, snp_report=outblob, certificates=certificates_from_table(auxblob))


def pack_ext_report_request(report_data: bytes, vmpl: int, certs_address: int, certs_len: int) -> bytes:
    """struct snp_ext_report_req."""
    return SNP_EXT_REPORT_REQ.pack(report_data, vmpl, certs_address, certs_len)


def pack_guest_request(req_address: int, resp_address: int) -> bytearray:
    """struct snp_guest_request_ioctl with msg_version 1."""
    return bytearray(struct.pack("<B7xQQQ", 1, req_address, resp_address, 0))


def parse_report_response(resp: bytes) -> bytes:
    """The report from a 4000-byte firmware response {status, report_size, reserved[24], report}."""
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise RuntimeError(f"SEV firmware returned status {status:#x} for the report request")
    if size != REPORT_SIZE:
        raise RuntimeError(f"SEV firmware returned a {size}-byte report; expected {REPORT_SIZE}")
    return bytes(resp[32 : 32 + REPORT_SIZE])


class SevGuestProvider:
    """/dev/sev-guest SNP_GET_EXT_REPORT (kernels without configfs-tsm)."""

    name = "sev-snp"
    simulated = False

    def __init__(self, device: str | Path = SEV_GUEST, vmpl: int = 0):
        self.device = Path(device)
        self.vmpl = vmpl

    def unavailable_reason(self) -> str | None:
        if not self.device.exists():
            return f"{self.device} is missing: not an SEV-SNP guest or the sev-guest driver is not loaded"
        if not os.access(self.device, os.R_OK | os.W_OK):
            return f"{self.device} is not readable and writable by this user"
        return None

    def collect(self, report_data: bytes) -> Evidence:
        import ctypes
        import fcntl

        _check_report_data(report_data)
        certs_len = 4 * 4096
        for _ in range(3):
            certs = ctypes.create_string_buffer(certs_len)
            req = ctypes.create_string_buffer(
                pack_ext_report_request(report_data, self.vmpl, ctypes.addressof(certs), certs_len), SNP_EXT_REPORT_REQ.size)
            resp = ctypes.create_string_buffer(SNP_RESP_SIZE)
            arg = pack_guest_request(ctypes.addressof(req), ctypes.addressof(resp))
            with open(self.device, "rb+", buffering=0) as dev:
                try:
                    fcntl.ioctl(dev.fileno(), SNP_GET_EXT_REPORT, arg, True)
                except OSError as exc:
                    vmm_error = struct.unpack_from("<Q", arg, 24)[0] >> 32
                    if vmm_error == SNP_GUEST_VMM_ERR_INVALID_LEN:
                        certs_len = SNP_EXT_REPORT_REQ.unpack(req.raw)[3]  # the kernel wrote back the needed length
                        continue
                    raise RuntimeError(f"SNP_GET_EXT_REPORT failed: {exc} (vmm error {vmm_error})") from exc
            report = parse_report_response(resp.raw)
            return Evidence(provider=self.name, snp_report=report, certificates=certificates_from_table(certs.raw))
        raise RuntimeError("SNP_GET_EXT_REPORT: the certificate buffer size kept changing; retry")


class SnpProvider:
    """configfs-tsm when present, else /dev/sev-guest."""

    name = "sev-snp"
    simulated = False

    def __init__(self, configfs: str | Path = CONFIGFS_TSM, device: str | Path = SEV_GUEST):
        self.backends = (ConfigfsTsmProvider(configfs), SevGuestProvider(device))

    def _usable(self):
        return next((b for b in self.backends if b.unavailable_reason() is None), None)

    def unavailable_reason(self) -> str | None:
        if self._usable() is not None:
            return None
        return "no SEV-SNP guest interface: " + "; ".join(b.unavailable_reason() for b in self.backends)

    def collect(self, report_data: bytes) -> Evidence:
        backend = self._usable()
        if backend is None:
            raise RuntimeError(self.unavailable_reason())
        return backend.collect(report_data)
