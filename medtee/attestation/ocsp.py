"""Certificate revocation from cached OCSP responses (offline: nothing is fetched).

Cache layout: `<ocsp_cache>/<certificate serial number, lowercase hex>.der`, one DER OCSP response per certificate
(e.g. as written by `openssl ocsp -respout`). A response counts only when it is signed by the certificate's issuer or by
a responder certificate that the issuer signed with the OCSP-signing EKU, names this certificate (CertID), and is
current at the appraisal clock (thisUpdate <= now <= nextUpdate); a genuine "revoked" counts outside its window too.
With a `freshness.Newest`, an answer older than the newest accepted for the certificate (an older copy put back) is
REFUSED, and so is a certificate an answer accepted before revoked, whatever the cache holds now (another answer,
an expired one, none): refused fails under every revocation stance, as revoked does.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from medtee.attestation.certs import X509_ERRORS, issuer_problem, serial_number
from medtee.attestation.freshness import Newest

GOOD, REVOKED, UNKNOWN, REFUSED = "good", "revoked", "unknown", "refused"
MAX_RESPONSE_BYTES = 1 << 20


def _kind(cert: x509.Certificate, issuer: x509.Certificate) -> str:
    """The rollback record's name for `cert`: its issuer's key and its serial, whatever hash a CertID used."""
    return f"nvidia-ocsp/{_issuer_key_sha256(issuer)}/{cert.serial_number:x}"


def _issuer_key_sha256(issuer: x509.Certificate) -> str:
    """What names an issuer in the rollback record: the SHA-256 of its public key (a CertID's own key hash depends
    on the hash the response chose, so two copies for one certificate could be told apart)."""
    import hashlib

    return hashlib.sha256(issuer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _signed_by(key, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _responder_matches(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    digest = hashes.Hash(hashes.SHA1())
    digest.update(cert.public_key().public_bytes(*_spki_raw(cert)))
    return resp.responder_key_hash == digest.finalize()


def _spki_raw(cert: x509.Certificate):
    """Encoding of the subjectPublicKey BIT STRING contents (what ResponderID byKey hashes)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return Encoding.X962, PublicFormat.UncompressedPoint
    return Encoding.DER, PublicFormat.PKCS1


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime) -> x509.Certificate | None:
    """The issuer itself, or a delegated responder certificate from the response that the issuer authorised."""
    if _responder_matches(resp, issuer):
        return issuer
    for cand in resp.certificates:
        if not _responder_matches(resp, cand) or issuer_problem(cand, issuer):
            continue
        try:
            eku = cand.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku and cand.not_valid_before_utc <= now <= cand.not_valid_after_utc:
            return cand
    return None


def revocation_status(cert: x509.Certificate, issuer: x509.Certificate, cache_dir: str | None,
                      now: datetime, newest: Newest | None = None) -> tuple[str, str]:
    """(good | revoked | unknown | refused, why) for one certificate from the cache; a malformed response is unknown.
    With `newest`, a certificate an answer accepted before revoked is revoked whatever the cache holds now (none, an
    expired one), and an answer it refuses is refused (see the module docstring)."""
    from medtee.files import NotRegularFile, read_regular

    if newest and (why := newest.standing(_kind(cert, issuer))):
        return REFUSED, why
    if not cache_dir:
        return UNKNOWN, "no ocsp_cache configured"
    path = Path(cache_dir) / f"{serial_number(cert):x}.der"
    try:
        resp = ocsp.load_der_ocsp_response(read_regular(path, MAX_RESPONSE_BYTES))
    except NotRegularFile as exc:
        return UNKNOWN, f"cached response {path.name} {exc}"
    except OSError:
        return UNKNOWN, f"no cached response {path.name}"
    except ValueError:
        return UNKNOWN, f"{path.name} is not a DER OCSP response"
    try:
        return _status(resp, cert, issuer, now, newest)
    except X509_ERRORS as exc:  # fields and responder certificates decode lazily
        return UNKNOWN, f"{path.name}: malformed OCSP response ({type(exc).__name__})"


def _status(resp: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate,
            now: datetime, newest: Newest | None) -> tuple[str, str]:
    """What a loaded response says about `cert` (counting only as the module docstring describes)."""
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return UNKNOWN, f"responder status {resp.response_status.name}"
    signer = _signer(resp, issuer, now)
    try:
        algorithm = resp.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if signer is None or not _signed_by(signer.public_key(), resp.signature, resp.tbs_response_bytes, algorithm):
        return UNKNOWN, "response not signed by the issuer or an authorised OCSP responder"
    for single in resp.responses:
        cert_id = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, single.hash_algorithm).build()
        if (single.serial_number, single.issuer_name_hash, single.issuer_key_hash) != (
                cert_id.serial_number, cert_id.issuer_name_hash, cert_id.issuer_key_hash):
            continue
        if single.certificate_status is ocsp.OCSPCertStatus.REVOKED:  # genuine: final, inside its window or not
            if newest:
                newest.admit(_kind(cert, issuer), single.this_update_utc, revokes=True)
            return REVOKED, f"revoked at {single.revocation_time_utc.isoformat()}"
        if single.this_update_utc > now:
            return UNKNOWN, f"response not yet valid (thisUpdate {single.this_update_utc.isoformat()})"
        if single.next_update_utc is None or now > single.next_update_utc:
            until = single.next_update_utc.isoformat() if single.next_update_utc else "absent"
            return UNKNOWN, f"response expired (nextUpdate {until})"
        refused = newest.admit(_kind(cert, issuer), single.this_update_utc) if newest else None
        if refused:
            return REFUSED, f"response {refused}"
        if single.certificate_status is ocsp.OCSPCertStatus.GOOD:
            return GOOD, "good"
        return UNKNOWN, "responder does not know the certificate"
    return UNKNOWN, "response is for another certificate"
