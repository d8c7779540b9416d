"""AMD's CRL (revoked ASKs/ASVKs) from the cache: genuine and current, or the check fails closed."""

import dataclasses
import os
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from medtee.attestation import Evidence, appraise, load_policy
from medtee.attestation import amd
from medtee.attestation.amd import crl_path, revocation_check
from medtee.attestation.policy import Revocation
from medtee.attestation.snp import SnpReport

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)  # how AMD's ARK signs


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, key, signer, serial: int) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(serial).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=365)).sign(signer, hashes.SHA384(), rsa_padding=PSS))


@pytest.fixture(scope="module")
def roots():
    """A stand-in ARK-Milan and ASK (SEV-Milan): AMD's real ARK cannot sign a test CRL."""
    ark_key, ask_key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    ark = _cert("ARK-Milan", "ARK-Milan", ark_key, ark_key, 1)
    return ark_key, {"ark": ark, "ask": _cert("SEV-Milan", "ARK-Milan", ask_key, ark_key, 0x1234),
                     "asvk": _cert("SEV-VLEK-Milan", "ARK-Milan", ask_key, ark_key, 0x5678)}


@pytest.fixture
def pinned(monkeypatch, roots):
    monkeypatch.setattr(amd, "pinned", lambda product, name: roots[1][name])
    return roots


def _write_crl(cache, signer, revoked=(), *, key="vcek", issuer="ARK-Milan", days=(-1, 30), number=None):
    builder = (x509.CertificateRevocationListBuilder().issuer_name(_name(issuer))
               .last_update(NOW + timedelta(days=days[0])).next_update(NOW + timedelta(days=days[1])))
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(days=2)).build())
    path = crl_path(cache, "Milan", key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(builder.sign(signer, hashes.SHA384(), rsa_padding=PSS).public_bytes(Encoding.DER))


def _check(cache, stance=Revocation.fail_closed, key="vcek", newest=None):
    return revocation_check("Milan", key, None, str(cache), stance, NOW, newest)


def test_a_current_crl_from_the_pinned_ark_that_lists_nothing_passes(tmp_path, pinned):
    _write_crl(tmp_path, pinned[0], revoked=[0x9999])
    result = _check(tmp_path)
    assert result.ok and "none of SEV-Milan listed" in result.actual


@pytest.mark.parametrize("key, serial, name", [("vcek", 0x1234, "SEV-Milan"), ("vlek", 0x5678, "SEV-VLEK-Milan")])
def test_a_revoked_intermediate_fails_under_every_stance(tmp_path, pinned, key, serial, name):
    _write_crl(tmp_path, pinned[0], revoked=[serial], key=key)
    for stance in (Revocation.fail_closed, Revocation.fail_open):
        result = _check(tmp_path, stance, key)
        assert not result.ok and result.actual == f"revoked by AMD: {name}"


@pytest.mark.parametrize("make, why", [
    (lambda cache, ark: None, "no CRL at"),
    (lambda cache, ark: _write_crl(cache, rsa.generate_private_key(65537, 2048)), "is not signed by the pinned ARK-Milan"),
    (lambda cache, ark: _write_crl(cache, ark, issuer="ARK-Genoa"), "is not signed by the pinned ARK-Milan"),
    (lambda cache, ark: _write_crl(cache, ark, days=(-60, -1)), "not current"),
    (lambda cache, ark: _write_crl(cache, ark, days=(1, 30)), "not current"),
    (lambda cache, ark: crl_path(cache, "Milan", "vcek").parent.mkdir(parents=True) or
     crl_path(cache, "Milan", "vcek").write_bytes(b"not a CRL"), "unusable (ValueError)"),
])
def test_a_crl_that_is_missing_foreign_stale_or_malformed_fails_closed_and_warns_open(tmp_path, pinned, make, why):
    make(tmp_path, pinned[0])
    closed, opened = _check(tmp_path), _check(tmp_path, Revocation.fail_open)
    assert not closed.ok and why in closed.actual
    assert opened.ok and opened.actual.startswith("WARNING, not established (fail-open)") and why in opened.actual


def test_a_pem_copy_of_the_crl_is_the_same_crl(tmp_path, pinned):
    _write_crl(tmp_path, pinned[0], revoked=[0x1234])
    path = crl_path(tmp_path, "Milan", "vcek")
    path.write_bytes(x509.load_der_x509_crl(path.read_bytes()).public_bytes(Encoding.PEM))
    result = _check(tmp_path)
    assert not result.ok and result.actual == "revoked by AMD: SEV-Milan"


@pytest.mark.parametrize("make, why", [
    (lambda path: os.mkfifo(path), "is not a regular file (a directory, FIFO, device or a link to one)"),
    (lambda path: os.symlink("/dev/zero", path), "is not a regular file"),
    (lambda path: path.write_bytes(b"0" * (amd.MAX_CRL_BYTES + 1)), f"has {amd.MAX_CRL_BYTES + 1} bytes; at most"),
])
def test_a_crl_path_holding_no_crl_file_says_what_it_holds(tmp_path, pinned, make, why):
    path = crl_path(tmp_path, "Milan", "vcek")
    path.parent.mkdir(parents=True)
    make(path)
    result = _check(tmp_path)
    assert not result.ok and result.actual.startswith(f"CRL {path} {why}")


def test_production_policies_check_amd_revocation_and_fail_closed_without_the_crl(vectors, tmp_path):
    """The real Milan report and VCEK under snp_h200's CPU rules: the policy checks AMD's CRL, which this cache lacks."""
    ev = Evidence(provider="file", snp_report=(vectors / "snp/automata/report.bin").read_bytes(),
                  certificates=((vectors / "snp/automata/vek_cert.der").read_bytes(),))
    report = SnpReport.parse(ev.snp_report)
    base = load_policy("snp_h200")
    assert base.amd_revocation is Revocation.fail_closed
    policy = dataclasses.replace(base, gpu_provider=None, gpu=dataclasses.replace(base.gpu, required=False),
                                 cert_cache_dir=str(tmp_path), measurements=[report.measurement.hex()])
    checks = {c.name: c for c in appraise(ev, policy, expected_report_data=report.report_data).checks}
    assert not checks["amd.revocation"].ok and f"no CRL at {tmp_path}/Milan/crl/vcek.der" in checks["amd.revocation"].actual
    open_policy = dataclasses.replace(policy, amd_revocation=Revocation.fail_open)
    verdict = appraise(ev, open_policy, expected_report_data=report.report_data)
    assert verdict.ok, verdict.explain()


def test_an_older_crl_put_back_in_the_cache_establishes_nothing(tmp_path, pinned):
    """Both CRLs are genuine and current. An appraiser keeping the newest it accepted (the broker) refuses the older
    one under every stance (someone put it back: it is not a missing answer); one that keeps none cannot tell."""
    from medtee.attestation.freshness import Newest

    newest = Newest(tmp_path / "seen.json")
    cache = tmp_path / "cache"
    _write_crl(cache, pinned[0], revoked=[0x9999], days=(-1, 30), number=7)  # lists another certificate
    assert _check(cache, newest=newest).ok
    _write_crl(cache, pinned[0], days=(-3, 30), number=6)  # last week's
    assert _check(cache).ok  # no memory: the older CRL passes
    for stance in (Revocation.fail_closed, Revocation.fail_open):
        result = _check(cache, stance, newest=newest)
        assert not result.ok and "older than one accepted before" in result.actual and "CRL number 7" in result.actual
    _write_crl(cache, pinned[0], days=(-1, 30), number=6)  # the same date, a lower number
    assert "older than one accepted before" in _check(cache, newest=newest).actual
    _write_crl(cache, pinned[0], days=(0, 30), number=8)  # a newer one is accepted and becomes the newest
    assert _check(cache, newest=newest).ok
    _write_crl(cache, pinned[0], days=(-1, 30), number=7)
    assert not _check(cache, newest=newest).ok


def test_an_amd_revocation_is_never_undone(tmp_path, pinned):
    """A genuine CRL that lists the ASK revokes it whatever its window, and for good: a newer CRL without it, an
    expired one or none at all does not bring it back. A damaged record fails under every stance too."""
    from medtee.attestation.freshness import Newest

    newest = Newest(tmp_path / "seen.json")
    cache = tmp_path / "cache"
    _write_crl(cache, pinned[0], revoked=[0x1234], days=(-5, -1), number=2)  # expired, but AMD signed it
    assert _check(cache, Revocation.fail_open, newest=newest).actual == "revoked by AMD: SEV-Milan"
    for stance in (Revocation.fail_closed, Revocation.fail_open):
        for later in ({"days": (0, 30), "number": 8}, {"days": (-9, -8), "number": 1}, None):
            crl_path(cache, "Milan", "vcek").unlink(missing_ok=True)
            if later is not None:
                _write_crl(cache, pinned[0], **later)
            result = _check(cache, stance, newest=newest)
            assert not result.ok and "SEV-Milan: revoked by a document of" in result.actual
            assert "revocation is never undone" in result.actual
    assert _check(cache).ok is False  # no memory, and no CRL left: not established
    (tmp_path / "seen.json").write_text('{"amd-crl/Milan/vcek": {"issued": "2026-01-01T00:00:00"}}')  # no zone
    _write_crl(cache, pinned[0], days=(0, 30), number=8)
    for stance in (Revocation.fail_closed, Revocation.fail_open):
        result = _check(cache, stance, newest=newest)
        assert not result.ok and f"{tmp_path / 'seen.json'} (the newest revocation documents accepted) is " \
            f"damaged" in result.actual


def test_a_listed_vcek_is_not_recorded_for_every_chip(tmp_path, pinned):
    """Every VCEK of a product has the same name and serial (0): only the ASK/ASVK the ARK issued is recorded as
    revoked for good, so one CRL listing a VCEK's serial does not block every chip after AMD's next CRL."""
    from medtee.attestation.freshness import Newest

    chips = [_cert("SEV-VCEK", "SEV-Milan", rsa.generate_private_key(65537, 2048), pinned[0], 7) for _ in range(2)]
    newest = Newest(tmp_path / "seen.json")
    _write_crl(tmp_path, pinned[0], revoked=[7], days=(-2, 30), number=1)
    assert not revocation_check("Milan", "vcek", chips[0], str(tmp_path), Revocation.fail_closed, NOW, newest).ok
    _write_crl(tmp_path, pinned[0], days=(-1, 30), number=2)  # AMD's next CRL lists nothing
    assert revocation_check("Milan", "vcek", chips[1], str(tmp_path), Revocation.fail_closed, NOW, newest).ok
