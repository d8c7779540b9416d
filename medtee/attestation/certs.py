"""X.509 certificates from evidence, parsed strictly: each is loaded and decoded in full at once, so malformed input
raises only EvidenceFormatError (naming the exception type and position, never bytes) and the verifiers' later
property accesses cannot fail."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning

from medtee.attestation.evidence import EvidenceFormatError

# What cryptography raises for malformed certificates, on loading or on a lazy property (extensions, keys, names...).
X509_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion)
PEM_BEGIN, PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
ZERO_SERIAL = "Parsed a serial number which wasn't positive"  # cryptography's warning; every AMD VCEK/VLEK has serial 0
_WARNINGS = threading.Lock()  # catch_warnings swaps process-wide state: this module's uses must not interleave


def _decode(cert: x509.Certificate) -> None:
    """Touch every lazily decoded property the verifiers use."""
    _ = (cert.version, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
         cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), list(cert.extensions), cert.public_key(),
         cert.signature_hash_algorithm, cert.signature_algorithm_parameters)


def _strict(load: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    """Load and decode one certificate; any error, or a warning other than the zero serial, makes it malformed."""
    with _WARNINGS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cert = load(data)
            _decode(cert)
        except X509_ERRORS as exc:
            raise EvidenceFormatError(f"malformed X.509 certificate ({type(exc).__name__})") from None
    odd = [w.category.__name__ for w in caught if w.filename == __file__ and not str(w.message).startswith(ZERO_SERIAL)]
    if odd:
        raise EvidenceFormatError(f"malformed X.509 certificate ({odd[0]})")
    return cert


def parse_der(der: bytes) -> x509.Certificate:
    """One DER certificate, fully decoded; raises EvidenceFormatError."""
    return _strict(x509.load_der_x509_certificate, der)


def parse_certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates of PEM data (one or more blocks) or of one DER certificate; raises EvidenceFormatError."""
    if PEM_BEGIN not in data:
        if not data.startswith(b"\x30"):
            raise EvidenceFormatError("neither a PEM nor a DER certificate")
        return [parse_der(data)]
    out = []
    for j, chunk in enumerate(data.split(PEM_BEGIN)[1:], 1):
        body, end, _ = chunk.partition(PEM_END)
        if not end:
            raise EvidenceFormatError(f"PEM block {j}: no END CERTIFICATE line")
        try:
            out.append(_strict(x509.load_pem_x509_certificate, PEM_BEGIN + body + PEM_END))
        except EvidenceFormatError as exc:
            raise EvidenceFormatError(f"PEM block {j}: {exc}") from None
    return out


def parse_each(entries: Iterable[bytes]) -> tuple[list[x509.Certificate], list[str]]:
    """The certificates of every entry (PEM or DER) that parses, and "certificate i: <problem>" (i from 1) for the
    rest."""
    certs: list[x509.Certificate] = []
    problems = []
    for i, data in enumerate(entries, 1):
        try:
            certs += parse_certificates(data)
        except EvidenceFormatError as exc:
            problems.append(f"certificate {i}: {exc}")
    return certs, problems


def issuer_problem(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when `issuer` directly issued `cert` (issuer name and signature); else why not, as an exception type."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return type(exc).__name__
    return None


def issuing_problem(issuer: x509.Certificate, below: int) -> str | None:
    """None when `issuer` may issue a certificate with `below` CA certificates under it in the chain (RFC 5280
    4.2.1.9: basicConstraints CA, within its path length); else why not. A signature by a key whose certificate is
    not a CA's proves nothing about the certificates it signs."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "not a CA (no basicConstraints)"
    except ValueError:
        return "not a CA (unreadable extensions)"
    if not constraints.ca:
        return "not a CA (basicConstraints CA:FALSE)"
    if constraints.path_length is not None and below > constraints.path_length:
        return f"its path length {constraints.path_length} allows fewer CAs under it than {below}"
    return None


def common_name(cert: x509.Certificate) -> str:
    """The subject CN for matching and check texts (characters other than printable ASCII become '?')."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        return "(no common name)"
    return "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in str(names[0].value))


def serial_number(cert: x509.Certificate) -> int:
    """The serial number, without cryptography's warning for a zero serial."""
    with _WARNINGS, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ZERO_SERIAL, CryptographyDeprecationWarning)
        return cert.serial_number
