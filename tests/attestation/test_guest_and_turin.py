"""Guest-side collection logic (fake configfs tree, ioctl packing) and Turin's TCB layout with a synthetic report."""

import datetime as dt
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from medtee.attestation.amd import build_cert_table, key_cert_info, parse_cert_table, tcb_checks
from medtee.attestation.snp import SnpReport, sign_report, signature_check, structure_checks
from medtee.attestation.snp_guest import (SNP_GET_EXT_REPORT, ConfigfsTsmProvider, SevGuestProvider, SnpProvider,
                                          pack_ext_report_request, pack_guest_request, parse_report_response)

RD = bytes(range(64))


class FakeTsm:
    """A directory standing in for /sys/kernel/config/tsm/report (files instead of configfs attributes)."""

    def __init__(self, root, report, aux=b"", provider="sev_guest", bump=1):
        self.root, self.report, self.aux, self.provider, self.bump = root, report, aux, provider, bump
        root.mkdir(exist_ok=True)

    def install(self, monkeypatch):
        fake = self
        orig = type(self.root).mkdir

        def mkdir(path, *a, **k):
            orig(path, *a, **k)
            if path.parent == fake.root:
                (path / "generation").write_text("7")
                (path / "provider").write_text(fake.provider + "\n")
                (path / "outblob").write_bytes(fake.report)
                (path / "auxblob").write_bytes(fake.aux)

        orig_rmdir = type(self.root).rmdir

        def rmdir(path):
            for f in path.iterdir():
                f.unlink()
            orig_rmdir(path)

        orig_write = type(self.root).write_bytes

        def write_bytes(path, data):
            orig_write(path, data)
            if path.name == "inblob":
                (path.parent / "generation").write_text(str(7 + fake.bump))

        monkeypatch.setattr(type(self.root), "mkdir", mkdir)
        monkeypatch.setattr(type(self.root), "rmdir", rmdir)
        monkeypatch.setattr(type(self.root), "write_bytes", write_bytes)


def test_configfs_collects_report_and_certificates(tmp_path, monkeypatch):
    report = bytes(1184)
    FakeTsm(tmp_path / "tsm", report, build_cert_table({"vcek": b"VCEK", "ask": b"ASK"})).install(monkeypatch)
    ev = ConfigfsTsmProvider(tmp_path / "tsm").collect(RD)
    assert ev.snp_report == report and ev.certificates == (b"VCEK", b"ASK") and not ev.simulated
    assert list((tmp_path / "tsm").iterdir()) == []  # the request directory is removed


def test_configfs_detects_concurrent_writer(tmp_path, monkeypatch):
    FakeTsm(tmp_path / "tsm", bytes(1184), bump=2).install(monkeypatch)
    with pytest.raises(RuntimeError, match="another writer"):
        ConfigfsTsmProvider(tmp_path / "tsm").collect(RD)


def test_configfs_rejects_other_tsm_provider(tmp_path, monkeypatch):
    FakeTsm(tmp_path / "tsm", bytes(1184), provider="tdx_guest").install(monkeypatch)
    with pytest.raises(RuntimeError, match="not an SEV-SNP guest"):
        ConfigfsTsmProvider(tmp_path / "tsm").collect(RD)


def test_unavailable_reasons_name_what_is_missing(tmp_path):
    reason = SnpProvider(configfs=tmp_path / "none", device=tmp_path / "sev-guest").unavailable_reason()
    assert "configfs-tsm" in reason and "sev-guest" in reason
    with pytest.raises(ValueError, match="64 bytes"):
        ConfigfsTsmProvider(tmp_path).collect(b"short")


def test_cert_table_roundtrip_and_errors():
    blob = build_cert_table({"vlek": b"L" * 10, "ark": b"A" * 3})
    assert parse_cert_table(blob) == {"vlek": b"L" * 10, "ark": b"A" * 3}
    with pytest.raises(ValueError, match="terminating"):
        parse_cert_table(blob[:20])


def test_ioctl_structures():
    assert SNP_GET_EXT_REPORT == 0xC0205302  # _IOWR('S', 2, 32 bytes)
    req = pack_ext_report_request(RD, 0, 0x1000, 0x4000)
    assert len(req) == 112 and req[:64] == RD and struct.unpack_from("<QI", req, 96) == (0x1000, 0x4000)
    arg = pack_guest_request(0x10, 0x20)
    assert len(arg) == 32 and arg[0] == 1 and struct.unpack_from("<QQQ", arg, 8) == (0x10, 0x20, 0)
    assert "sev-guest" in SevGuestProvider("/nonexistent/sev-guest").unavailable_reason()


def test_firmware_response_parsing(vectors):
    resp = (vectors / "snp/lit-protocol/snp_report_msg_resp.bin").read_bytes()
    report = parse_report_response(resp)
    assert SnpReport.parse(report).version == 2
    bad = struct.pack("<II", 0x16, 1184) + resp[8:]
    with pytest.raises(RuntimeError, match="status 0x16"):
        parse_report_response(bad)


def _turin_vcek(key, chip8: bytes, spl: dict) -> x509.Certificate:
    def ext(oid, der):
        return x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1." + oid), der)

    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VCEK")])
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    b = b.add_extension(ext("1", b"\x02\x01\x01"), False).add_extension(ext("2", b"\x16\x05Turin"), False)
    for oid, value in spl.items():
        b = b.add_extension(ext(oid, bytes([2, 1, value])), False)
    b = b.add_extension(ext("4", b"\x04\x08" + chip8), False)  # DER OCTET STRING form
    return b.sign(key, hashes.SHA384())


def test_synthetic_turin_report_uses_turin_tcb_layout():
    key = ec.generate_private_key(ec.SECP384R1())
    chip8 = bytes.fromhex("1e550a8ee5cf9f4d")
    body = bytearray(0x2A0)
    struct.pack_into("<IIQ", body, 0, 3, 0, 0x30000)
    struct.pack_into("<I", body, 0x034, 1)
    # REPORTED_TCB Turin: FMC=1, bootloader=2, TEE=3, SNP=4, reserved 4-6, microcode=9
    body[0x180:0x188] = bytes([1, 2, 3, 4, 0, 0, 0, 9])
    body[0x188:0x18B] = bytes([0x1A, 0x02, 0x01])  # CPUID family 0x1A: Turin
    body[0x1A0:0x1A8] = chip8
    report = SnpReport.parse(sign_report(bytes(body), key))
    assert report.product == "Turin"
    assert report.reported_tcb("Turin").components() == {"bootloader": 2, "tee": 3, "snp": 4, "microcode": 9, "fmc": 1}
    assert all(c.ok for c in structure_checks(report, "Turin"))
    cert = _turin_vcek(key, chip8, {"3.9": 1, "3.1": 2, "3.2": 3, "3.3": 4, "3.8": 9})
    info = key_cert_info(cert)
    assert info.hwid == chip8 and info.struct_version == 1 and info.product == "Turin"
    assert all(c.ok for c in tcb_checks(report, info, "Turin"))
    assert signature_check(report, cert.public_key(), "test VCEK").ok
    # read with the Milan layout, the same bytes disagree with the certificate
    assert not all(c.ok for c in tcb_checks(report, info, "Milan"))


def test_turin_chip_id_tail_must_be_zero():
    key = ec.generate_private_key(ec.SECP384R1())
    body = bytearray(0x2A0)
    struct.pack_into("<IIQ", body, 0, 3, 0, 0x30000)
    struct.pack_into("<I", body, 0x034, 1)
    body[0x188:0x18B] = bytes([0x1A, 0x02, 0x01])
    body[0x1A0:0x1E0] = b"\x01" * 64
    report = SnpReport.parse(sign_report(bytes(body), key))
    assert "snp.chip_id.turin_tail" in {c.name for c in structure_checks(report, "Turin") if not c.ok}
