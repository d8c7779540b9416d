"""SIMULATED attestation for development profiles. IT PROTECTS NOTHING: the signing key is made in this process.

The report has the SEV-SNP layout (so parsing and binding checks are the real code path) and is signed with ECDSA
P-384 by a development key whose self-signed certificate is named SIMULATED. Production policies refuse it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
import sys
import threading
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from medtee.attestation.certs import common_name, issuer_problem, parse_certificates
from medtee.attestation.evidence import Evidence, EvidenceFormatError
from medtee.attestation.snp import POLICY_RESERVED_ONE, POLICY_SMT, SnpReport, sign_report, signature_check
from medtee.attestation.verdict import Check, check

SIMULATED_CN = "SIMULATED medtee development attestation key - protects nothing"
WARNING = "SIMULATED ATTESTATION: this evidence is signed by a key made in this process; it protects nothing."
SIMULATED_MEASUREMENT = hashlib.sha384(b"medtee simulated launch measurement").digest()


_DEV_KEY_LOCK = threading.Lock()


def _dev_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The in-process development key and its self-signed certificate (DER): made once, under a lock (`functools.cache`
    lets threads calling it first at once each make a key of their own, so one's evidence fails the other's check)."""
    with _DEV_KEY_LOCK:
        return _make_dev_key()


@cache
def _make_dev_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SIMULATED_CN)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return key, cert.public_bytes(Encoding.DER)


def simulated_report(report_data: bytes) -> bytes:
    """A 1184-byte SNP-shaped report (version 3, Genoa CPUID, VCEK key info, CHIP_ID masked) signed by the dev key."""
    if len(report_data) != 64:
        raise ValueError(f"report_data must be 64 bytes; got {len(report_data)}")
    body = bytearray(0x2A0)
    struct.pack_into("<IIQ", body, 0, 3, 0, POLICY_RESERVED_ONE | POLICY_SMT)
    struct.pack_into("<I", body, 0x034, 1)  # ECDSA P-384 with SHA-384
    body[0x050:0x090] = report_data
    body[0x090:0x0C0] = SIMULATED_MEASUREMENT
    body[0x140:0x160] = os.urandom(32)  # REPORT_ID
    body[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
    body[0x188:0x18B] = bytes([0x19, 0x11, 0x01])  # CPUID: Genoa
    return sign_report(bytes(body), _dev_key()[0])


class SimulatedProvider:
    """Development evidence provider (`simulated=True`); prints a loud warning to stderr on every collection."""

    name = "simulated"
    simulated = True

    def unavailable_reason(self) -> str | None:
        return None

    def collect(self, report_data: bytes) -> Evidence:
        print(WARNING, file=sys.stderr, flush=True)
        return Evidence(
            provider=self.name, snp_report=simulated_report(report_data), certificates=(_dev_key()[1],), simulated=True
        )


def simulated_signature_checks(report: SnpReport, certificates: tuple[bytes, ...]) -> list[Check]:
    """The report signature against the self-signed SIMULATED certificate carried with the evidence."""
    if not certificates:
        return [check("simulated.certificate", False, "the SIMULATED development certificate", "none supplied")]
    try:
        cert = parse_certificates(certificates[0])[0]
    except EvidenceFormatError as exc:
        return [check("simulated.certificate", False, "a parsable X.509 certificate", f"certificate 1: {exc}")]
    out = [check("simulated.certificate", common_name(cert) == SIMULATED_CN, SIMULATED_CN, common_name(cert))]
    self_signed = issuer_problem(cert, cert) is None
    out.append(check("simulated.certificate.self_signed", self_signed, "self-signed", "yes" if self_signed else "no"))
    out.append(signature_check(report, cert.public_key(), "SIMULATED development key"))
    return out
