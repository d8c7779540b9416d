"""OCSP revocation from a cache of DER responses, with a test CA and responses built here (no network)."""

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medtee.attestation import nvidia
from medtee.attestation.ocsp import GOOD, REFUSED, REVOKED, UNKNOWN, revocation_status
from medtee.attestation.policy import Revocation

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn, key, issuer_cn, signer, ca, eku=None):
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer_cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(days=10)).not_valid_after(NOW + timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(signer, hashes.SHA384())


@pytest.fixture(scope="module")
def pki():
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("root", "ica", "leaf", "resp", "bad", "other", "rogue")}
    root = _cert("Test root", keys["root"], "Test root", keys["root"], True)
    ica = _cert("Test ICA", keys["ica"], "Test root", keys["root"], True)
    leaf = _cert("Test leaf", keys["leaf"], "Test ICA", keys["ica"], False)
    resp = _cert("Test responder", keys["resp"], "Test ICA", keys["ica"], False, [ExtendedKeyUsageOID.OCSP_SIGNING])
    bad = _cert("Test no-EKU responder", keys["bad"], "Test ICA", keys["ica"], False)
    other = _cert("Test leaf 2", keys["other"], "Test ICA", keys["ica"], False)
    rogue = _cert("Test ICA", keys["rogue"], "Test ICA", keys["rogue"], True, [ExtendedKeyUsageOID.OCSP_SIGNING])
    return dict(keys=keys, root=root, ica=ica, leaf=leaf, resp=resp, bad=bad, other=other, rogue=rogue)


def response(pki, cert, issuer, *, status=ocsp.OCSPCertStatus.GOOD, signer="issuer", this=-1, nxt=1,
             cert_id_hash=hashes.SHA1):
    """A DER OCSP response for cert (its CertID hashed with `cert_id_hash`); signer: 'issuer', 'resp' (delegated),
    'bad' (no EKU) or 'rogue'."""
    issuer_key = pki["keys"]["ica"] if issuer is pki["ica"] else pki["keys"]["root"]
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=issuer, algorithm=cert_id_hash(), cert_status=status,
        this_update=NOW + timedelta(days=this), next_update=NOW + timedelta(days=nxt),
        revocation_time=NOW - timedelta(days=2) if status is ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None)
    if signer == "issuer":
        b, key = b.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer), issuer_key
    elif signer == "rogue":  # a look-alike of the issuer (same name, another key)
        b, key = b.responder_id(ocsp.OCSPResponderEncoding.NAME, pki["rogue"]), pki["keys"]["rogue"]
    else:
        b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, pki[signer]).certificates([pki[signer]])
        key = pki["keys"][signer]
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def put(tmp_path, cert, der):
    (tmp_path / f"{cert.serial_number:x}.der").write_bytes(der)


@pytest.mark.parametrize("kwargs, expected, why", [
    ({}, GOOD, "good"),
    ({"signer": "resp"}, GOOD, "good"),  # delegated responder with the OCSP-signing EKU
    ({"status": ocsp.OCSPCertStatus.REVOKED}, REVOKED, "revoked at"),
    ({"this": -10, "nxt": -1}, UNKNOWN, "expired"),
    ({"this": 1, "nxt": 5}, UNKNOWN, "not yet valid"),
    ({"signer": "rogue"}, UNKNOWN, "not signed by the issuer"),
    ({"signer": "bad"}, UNKNOWN, "not signed by the issuer"),  # responder without the OCSP-signing EKU
    ({"status": ocsp.OCSPCertStatus.UNKNOWN}, UNKNOWN, "does not know"),
])
def test_cached_response_outcomes(pki, tmp_path, kwargs, expected, why):
    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"], **kwargs))
    status, detail = revocation_status(pki["leaf"], pki["ica"], str(tmp_path), NOW)
    assert status == expected and why in detail


def test_response_for_another_certificate_is_not_used(pki, tmp_path):
    put(tmp_path, pki["leaf"], response(pki, pki["other"], pki["ica"]))
    assert revocation_status(pki["leaf"], pki["ica"], str(tmp_path), NOW) == (UNKNOWN, "response is for another certificate")


def test_missing_and_garbage_responses_are_unknown(pki, tmp_path):
    assert revocation_status(pki["leaf"], pki["ica"], str(tmp_path), NOW)[0] == UNKNOWN
    assert revocation_status(pki["leaf"], pki["ica"], None, NOW) == (UNKNOWN, "no ocsp_cache configured")
    put(tmp_path, pki["leaf"], b"junk")
    assert "not a DER OCSP response" in revocation_status(pki["leaf"], pki["ica"], str(tmp_path), NOW)[1]


@pytest.fixture
def chain(pki, monkeypatch):
    monkeypatch.setattr(nvidia, "device_root", lambda: pki["root"])  # the test CA stands in for NVIDIA's root
    return [pki["leaf"], pki["ica"]]


@pytest.mark.parametrize("stance", [Revocation.fail_closed, Revocation.fail_open])
def test_all_good_passes(pki, tmp_path, chain, stance):
    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"]))
    put(tmp_path, pki["ica"], response(pki, pki["ica"], pki["root"]))
    c = nvidia.revocation_check(chain, stance, str(tmp_path), NOW, "gpu")
    assert c.ok and c.name == "gpu.revocation" and "WARNING" not in c.actual


def test_missing_response_fails_closed_and_warns_open(pki, tmp_path, chain):
    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"]))
    closed = nvidia.revocation_check(chain, Revocation.fail_closed, str(tmp_path), NOW, "gpu")
    assert not closed.ok and "Test ICA: no cached response" in closed.actual
    opened = nvidia.revocation_check(chain, Revocation.fail_open, str(tmp_path), NOW, "gpu")
    assert opened.ok and opened.actual.startswith("WARNING")


def test_expired_response_fails_closed(pki, tmp_path, chain):
    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"], this=-10, nxt=-1))
    put(tmp_path, pki["ica"], response(pki, pki["ica"], pki["root"]))
    assert not nvidia.revocation_check(chain, Revocation.fail_closed, str(tmp_path), NOW, "gpu").ok
    assert nvidia.revocation_check(chain, Revocation.fail_open, str(tmp_path), NOW, "gpu").ok


@pytest.mark.parametrize("stance", [Revocation.fail_closed, Revocation.fail_open])
def test_revoked_fails_under_every_stance(pki, tmp_path, chain, stance):
    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"], status=ocsp.OCSPCertStatus.REVOKED))
    put(tmp_path, pki["ica"], response(pki, pki["ica"], pki["root"]))
    c = nvidia.revocation_check(chain, stance, str(tmp_path), NOW, "gpu")
    assert not c.ok and "Test leaf: revoked at" in c.actual


@pytest.mark.parametrize("stance", [Revocation.fail_closed, Revocation.fail_open])
def test_an_older_good_answer_put_back_after_a_newer_one_is_refused(pki, tmp_path, stance):
    """OCSP answers are valid for days: with a record of the newest accepted (the broker's), last week's "good"
    cannot stand in for a newer answer, under any stance (someone put it back: it is not a missing answer)."""
    from medtee.attestation.freshness import Newest

    newest, cache = Newest(tmp_path / "seen.json"), tmp_path / "cache"
    cache.mkdir()
    put(cache, pki["ica"], response(pki, pki["ica"], pki["root"]))
    put(cache, pki["leaf"], response(pki, pki["leaf"], pki["ica"], this=-1, nxt=5))
    assert revocation_status(pki["leaf"], pki["ica"], str(cache), NOW, newest) == (GOOD, "good")
    put(cache, pki["leaf"], response(pki, pki["leaf"], pki["ica"], this=-3, nxt=5))
    assert revocation_status(pki["leaf"], pki["ica"], str(cache), NOW) == (GOOD, "good")  # no record: no memory
    status, why = revocation_status(pki["leaf"], pki["ica"], str(cache), NOW, newest)
    assert status == REFUSED and "older than one accepted before" in why
    chain = [pki["leaf"], pki["ica"], pki["root"]]
    c = nvidia.revocation_check(chain, stance, str(cache), NOW, "gpu", newest)
    assert not c.ok and "Test leaf: response older than one accepted before" in c.actual and "WARNING" not in c.actual
    older_sha256 = response(pki, pki["leaf"], pki["ica"], this=-3, nxt=5, cert_id_hash=hashes.SHA256)
    put(cache, pki["leaf"], older_sha256)  # the same certificate under a CertID hashed otherwise: still older
    status, why = revocation_status(pki["leaf"], pki["ica"], str(cache), NOW, newest)
    assert status == REFUSED and "older than one accepted before" in why
    put(cache, pki["other"], response(pki, pki["other"], pki["ica"], this=-5, nxt=5))  # another certificate's own
    assert revocation_status(pki["other"], pki["ica"], str(cache), NOW, newest) == (GOOD, "good")


@pytest.mark.parametrize("stance", [Revocation.fail_closed, Revocation.fail_open])
def test_a_revocation_is_never_undone(pki, tmp_path, stance):
    """A genuine "revoked" counts whatever its age or window, and once one was accepted for a certificate, whatever
    the cache holds later (a newer genuine "good", "unknown", an expired answer, none) does not bring it back."""
    from medtee.attestation.freshness import Newest

    newest, cache = Newest(tmp_path / "seen.json"), tmp_path / "cache"
    cache.mkdir()
    chain = [pki["leaf"], pki["ica"], pki["root"]]
    put(cache, pki["ica"], response(pki, pki["ica"], pki["root"]))
    put(cache, pki["leaf"], response(pki, pki["leaf"], pki["ica"], this=-1, nxt=5))
    assert revocation_status(pki["leaf"], pki["ica"], str(cache), NOW, newest) == (GOOD, "good")
    expired = response(pki, pki["leaf"], pki["ica"], this=-6, nxt=-4, status=ocsp.OCSPCertStatus.REVOKED)
    put(cache, pki["leaf"], expired)
    c = nvidia.revocation_check(chain, stance, str(cache), NOW, "gpu", newest)  # expired, older, but genuine
    assert not c.ok and "Test leaf: revoked at" in c.actual
    recorded = (NOW - timedelta(days=6)).isoformat()
    laters = [response(pki, pki["leaf"], pki["ica"], this=0, nxt=5),
              response(pki, pki["leaf"], pki["ica"], this=0, nxt=5, status=ocsp.OCSPCertStatus.UNKNOWN),
              response(pki, pki["leaf"], pki["ica"], this=-3, nxt=-2), None]
    for later in laters:
        (cache / f"{pki['leaf'].serial_number:x}.der").unlink()
        if later is not None:
            put(cache, pki["leaf"], later)
        got, why = revocation_status(pki["leaf"], pki["ica"], str(cache), NOW, newest)
        assert got == REFUSED and f"revoked by a document of {recorded} accepted before" in why
        c = nvidia.revocation_check(chain, stance, str(cache), NOW, "gpu", newest)
        assert not c.ok and "revocation is never undone" in c.actual and "WARNING" not in c.actual
    put(cache, pki["leaf"], laters[0])
    assert revocation_status(pki["leaf"], pki["ica"], str(cache), NOW) == (GOOD, "good")  # no record: no memory


@pytest.mark.parametrize("damage", ['{"x": {"issued": "2026-01-01T00:00:00"}}', '{"x": {"issued": 5}}',
                                    '{"x": {"issued": "2026-01-01T00:00:00+00:00", "number": "7"}}', "[]", "{"])
def test_a_damaged_record_fails_under_every_stance_naming_the_fix(pki, tmp_path, damage):
    from medtee.attestation.freshness import Newest

    put(tmp_path, pki["leaf"], response(pki, pki["leaf"], pki["ica"]))
    put(tmp_path, pki["ica"], response(pki, pki["ica"], pki["root"]))
    (tmp_path / "seen.json").write_text(damage)
    for stance in (Revocation.fail_closed, Revocation.fail_open):
        c = nvidia.revocation_check([pki["leaf"], pki["ica"], pki["root"]], stance, str(tmp_path), NOW, "gpu",
                                    Newest(tmp_path / "seen.json"))
        assert not c.ok and "seen.json (the newest revocation documents accepted) is damaged; restore it" in c.actual
