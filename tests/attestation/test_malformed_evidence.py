"""Malformed evidence never raises: `appraise` answers a Verdict and `medtee attest verify` exits 0, 1 or 2 with no
traceback. One regression case per exception cryptography raises for a malformed certificate (certificates made
here), then deterministic fuzzing of the real certificates and GPU evidence in ../shared/vectors."""

import base64
import contextlib
import dataclasses
import datetime as dt
import io
import re
import subprocess
import sys
import warnings

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from medtee.attestation import Evidence, GpuEvidence, Revocation, appraise, load_policy
from medtee.attestation.amd import build_cert_table
from medtee.attestation.certs import ZERO_SERIAL
from medtee.attestation.nvidia import parse_hex_report
from medtee.attestation.simulated import simulated_report
from medtee.attestation.snp_guest import certificates_from_table
from medtee.cli import main

NOW = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)  # inside every vector's validity, the VLEK's included
AUTH = load_policy("authenticity")
SAMPLES = "nvidia/nvtrust/local_gpu_verifier_samples"
REPORT, CHAIN = f"{SAMPLES}/hopperAttestationReport.txt", f"{SAMPLES}/hopperCertChain.txt"
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What a malformed certificate may be called in a check: positions and exception types, never bytes.
FORMAT_TEXT = re.compile(r"(certificate \d+: (PEM block \d+: )?(malformed X\.509 certificate \(\w+\)"
                         r"|no END CERTIFICATE line|neither a PEM nor a DER certificate)(; )?)+")


def verify(*argv: str) -> tuple[int, str, str]:
    """`medtee attest verify ARGV` in-process: (exit code, stdout, stderr); never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["attest", "verify", *argv])
    assert rc in (0, 1, 2)
    if rc == 2:
        assert err.getvalue().startswith("medtee: attest verify: ") and err.getvalue().count("\n") == 1
    else:
        assert err.getvalue() == ""
    return rc, out.getvalue(), err.getvalue()


# --- DER editing -------------------------------------------------------------------------------------------------

def _header(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, length, start of the value) of the TLV at pos (single-byte tags, definite lengths: real DER)."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, first, pos + 2
    n = first & 0x7F
    return tag, int.from_bytes(data[pos + 2 : pos + 2 + n], "big"), pos + 2 + n


def children(content: bytes) -> list[tuple[int, bytes]]:
    """The TLVs of a run of DER as (tag, value)."""
    out, pos = [], 0
    while pos < len(content):
        tag, n, start = _header(content, pos)
        out.append((tag, content[start : start + n]))
        pos = start + n
    return out


def enc(tag: int, value: bytes) -> bytes:
    n = len(value)
    size = (n.bit_length() + 7) // 8
    return bytes([tag]) + (bytes([n]) if n < 0x80 else bytes([0x80 | size]) + n.to_bytes(size, "big")) + value


def at(content: bytes, path: tuple[int, ...], fn) -> bytes:
    """`content` with the TLV at `path` (child indices, outermost first) replaced by fn(tag, value), lengths redone."""
    kids = [enc(t, v) for t, v in children(content)]
    tag, value = children(content)[path[0]]
    kids[path[0]] = fn(tag, value) if len(path) == 1 else enc(tag, at(value, path[1:], fn))
    return b"".join(kids)


def value_at(content: bytes, path: tuple[int, ...]) -> bytes:
    tag, value = children(content)[path[0]]
    return value if len(path) == 1 else value_at(value, path[1:])


def nodes(content: bytes, base: int = 0, path: tuple[int, ...] = ()):
    """(path, offset, tag, header length) of every TLV, descending into constructed ones."""
    pos = i = 0
    while pos < len(content):
        tag, n, start = _header(content, pos)
        yield path + (i,), base + pos, tag, start - pos
        if tag & 0x20:
            yield from nodes(content[start : start + n], base + start, path + (i,))
        pos, i = start + n, i + 1


TBS, SIGALG = (0, 0), (0, 1)
VERSION, SPKI_ALG, SUBJECT, EXTENSIONS = TBS + (0, 0), TBS + (6, 0, 0), TBS + (5,), TBS + (7, 0)
OID_UNKNOWN, OID_KEY_USAGE = enc(6, bytes.fromhex("2a0304")), enc(6, bytes.fromhex("551d0f"))
OID_CN, OID_COUNTRY = bytes.fromhex("550403"), bytes.fromhex("550406")
OIDS = [OID_UNKNOWN, OID_KEY_USAGE] + [enc(6, bytes.fromhex(h)) for h in (
    "551d13",  # basicConstraints
    "2a8648ce3d040303",  # ecdsa-with-SHA384
    "2a864886f70d01010a",  # rsassaPss
    "2a864886f70d01010b",  # sha256WithRSAEncryption
    "2a8648ce3d0201",  # id-ecPublicKey
    "2a864886f70d010101",  # rsaEncryption
    "2b8104002200",  # secp384r1 (wrong length on purpose: 2b81040022 is the real one)
    "2b6570",  # Ed25519
    "2b060104019c780104",  # AMD hwID
)]


def dup_extension(der: bytes, i: int = 0, j: int = 0) -> bytes:
    def dup(tag, value):
        exts = [enc(t, v) for t, v in children(value)]
        return enc(tag, b"".join(exts[:j] + [exts[i % len(exts)]] + exts[j:]))

    return at(der, EXTENSIONS, dup)


def cn_path(der: bytes) -> tuple[int, ...]:
    """The path of the subject's commonName attribute (SEQUENCE {OID, value})."""
    rdns = children(value_at(der, SUBJECT))
    return SUBJECT + (next(i for i, (_, rdn) in enumerate(rdns) if children(children(rdn)[0][1])[0][1] == OID_CN), 0)


def pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


# --- the five exception types cryptography raises (and a warning), one certificate each ----------------------------

CASES = {  # name: (edit of a good certificate, what then raises in cryptography, the exception)
    "DuplicateExtension": (dup_extension, lambda c: c.extensions, x509.DuplicateExtension),
    "InvalidVersion": (lambda d: at(d, VERSION, lambda t, v: enc(2, b"\x05")), lambda c: c, x509.InvalidVersion),
    "UnsupportedAlgorithm": (lambda d: at(d, SIGALG + (0,), lambda t, v: OID_UNKNOWN),
                             lambda c: c.signature_hash_algorithm, UnsupportedAlgorithm),
    "UnsupportedAlgorithm-key": (lambda d: at(d, SPKI_ALG, lambda t, v: OID_UNKNOWN), lambda c: c.public_key(),
                                 UnsupportedAlgorithm),
    "TypeError": (lambda d: at(d, cn_path(d) + (1,), lambda t, v: enc(3, b"\x00" + v)), lambda c: c.subject, TypeError),
    "ValueError": (lambda d: d[:-10], lambda c: c, ValueError),
    "ValueError-lazy": (lambda d: at(d, EXTENSIONS + (0, 0), lambda t, v: OID_KEY_USAGE),
                        lambda c: c.extensions, ValueError),
    "UserWarning": (lambda d: at(d, cn_path(d) + (0,), lambda t, v: enc(6, OID_COUNTRY)), lambda c: c.subject,
                    UserWarning),
}


@pytest.fixture(scope="module")
def good_cert() -> bytes:
    """A P-384 certificate with a recognised and an unrecognised extension, as the AMD and NVIDIA ones have."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VCEK")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.1"), b"\x02\x01\x00"),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA384()))
    return cert.public_bytes(Encoding.DER)


def minimal_spdm() -> bytes:
    """A well-formed SPDM 1.1 GET_MEASUREMENTS request||response with no blocks (and a zero signature)."""
    return bytes([0x11, 0xE0, 0, 0xFF]) + bytes(33) + bytes([0x11, 0x60, 0, 0, 0, 0, 0, 0]) + bytes(32 + 2 + 96)


@pytest.mark.parametrize("case", CASES)
def test_each_cryptography_error_is_a_failing_check(good_cert, case):
    edit, access, error = CASES[case]
    bad = edit(good_cert)
    with pytest.raises(error), warnings.catch_warnings():  # the case really triggers that error in cryptography
        warnings.simplefilter("error")
        cert = x509.load_der_x509_certificate(bad)
        access(cert)
    expected = f"certificate 1: malformed X.509 certificate ({error.__name__})"
    snp = appraise(Evidence(provider="file", snp_report=simulated_report(bytes(64)), certificates=(bad,)), AUTH,
                   expected_report_data=None)
    gpu = appraise(Evidence(provider="file", snp_report=b"", gpus=(GpuEvidence(minimal_spdm(), (good_cert, bad)),)),
                   AUTH, expected_report_data=None)
    assert ("snp.certificates", expected) in {(c.name, c.actual) for c in snp.failures()}
    assert [(c.name, c.actual) for c in gpu.failures()] == [("gpu[0].certificates", expected.replace("1:", "2:"))]


@pytest.mark.parametrize("case", CASES)
def test_cli_names_the_file_and_the_error(good_cert, tmp_path, case):
    edit, _, error = CASES[case]
    report, cert = tmp_path / "report.bin", tmp_path / "cert.der"
    report.write_bytes(simulated_report(bytes(64)))
    cert.write_bytes(edit(good_cert))
    rc, _, err = verify("--snp-report", str(report), "--snp-cert", str(cert), "--policy", "authenticity")
    assert rc == 2 and err == f"medtee: attest verify: {cert}: malformed X.509 certificate ({error.__name__})\n"


def test_zero_serial_is_accepted(good_cert):
    zero = at(good_cert, TBS + (1,), lambda t, v: enc(2, b"\x00"))  # like every AMD VCEK (signature now broken)
    with pytest.warns(UserWarning, match=ZERO_SERIAL):
        x509.load_der_x509_certificate(zero)
    verdict = appraise(Evidence(provider="file", snp_report=simulated_report(bytes(64)), certificates=(zero,)), AUTH,
                       expected_report_data=None)
    assert "snp.certificates" not in {c.name for c in verdict.checks}


def test_wrong_size_report_is_unusable_input(tmp_path):
    report = tmp_path / "report.bin"
    report.write_bytes(bytes(1000))
    rc, out, err = verify("--snp-report", str(report), "--policy", "authenticity")
    assert (rc, out) == (2, "")
    assert err == f"medtee: attest verify: {report}: an SEV-SNP report is 1184 bytes; this one has 1000\n"
    verdict = appraise(Evidence(provider="file", snp_report=bytes(1000)), AUTH, expected_report_data=None)
    assert verdict.explain() == "snp.report.format: expected a 1184-byte SEV-SNP report, got 1000 bytes"


@pytest.mark.parametrize("content, problem", [
    (b"zz", "not hex text"),
    (b"\xff\xfe", "not hex text"),
    (b"11e0", "SPDM report truncated in the request"),
])
def test_cli_unusable_gpu_report_names_the_file(vectors, tmp_path, content, problem):
    report = tmp_path / "gpu.txt"
    report.write_bytes(content)
    rc, _, err = verify("--gpu-report", str(report), "--gpu-certs", str(vectors / CHAIN), "--policy", "authenticity")
    assert rc == 2 and err.startswith(f"medtee: attest verify: {report}: {problem}") and err.count("\n") == 1


# --- GPU evidence alone --------------------------------------------------------------------------------------------

def test_cli_accepts_gpu_evidence_alone(vectors):
    rc, out, err = verify("--gpu-report", str(vectors / REPORT), "--gpu-certs", str(vectors / CHAIN),
                          "--policy", "authenticity")
    assert (rc, err) == (0, "") and out.startswith("ACCEPTED")


def test_gpu_evidence_alone_is_not_enough_for_a_release_policy(vectors):
    rc, out, _ = verify("--gpu-report", str(vectors / REPORT), "--gpu-certs", str(vectors / CHAIN),
                        "--policy", "snp_h200")
    assert rc == 1 and "snp.report: expected an SEV-SNP report, got none in the evidence" in out


def test_gpu_evidence_alone_is_not_enough_when_report_data_is_expected(real):
    verdict = appraise(dataclasses.replace(real["milan"], snp_report=b"", certificates=()), AUTH,
                       expected_report_data=bytes(64), now=NOW)
    assert [c.name for c in verdict.failures()] == ["snp.report"]


@pytest.mark.parametrize("argv", [
    ["--snp-cert", "vcek.der", "--gpu-report", "g", "--gpu-certs", "c"],
    ["--nonce", "00", "--gpu-report", "g", "--gpu-certs", "c"],
])
def test_cpu_options_without_a_cpu_report_are_refused(argv):
    rc, _, err = verify(*argv, "--policy", "authenticity")
    assert rc == 2 and "go with --snp-report" in err


# --- fuzzing the real vectors ----------------------------------------------------------------------------------------

def der_of(pem_file) -> bytes:
    return x509.load_pem_x509_certificate(pem_file.read_bytes()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def real(vectors) -> dict:
    """Genuine evidence to mutate: a Milan report with VCEK, ASK, ARK and an H100's evidence; a VLEK; a Turin VCEK."""
    chain = x509.load_pem_x509_certificates((vectors / CHAIN).read_bytes())
    gpu = GpuEvidence(report=parse_hex_report((vectors / REPORT).read_text()),
                      certificates=tuple(c.public_bytes(Encoding.DER) for c in chain))
    roots, snp = vectors / "snp/amd_roots/canonical", vectors / "snp"
    milan = Evidence(provider="file", snp_report=(snp / "automata/report.bin").read_bytes(), gpus=(gpu,),
                     certificates=((snp / "automata/vek_cert.der").read_bytes(), der_of(roots / "SEV-Milan.pem"),
                                   der_of(roots / "ARK-Milan.pem")))
    vlek = Evidence(provider="file", snp_report=(snp / "trustee/snp/test-vlek-report.bin").read_bytes(),
                    certificates=((snp / "trustee/snp/test-vlek.der").read_bytes(),))
    turin = dataclasses.replace(milan, certificates=((snp / "virtee-sev/vcek_turin.der").read_bytes(),), gpus=())
    return {"milan": milan, "vlek": vlek, "turin": turin}


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """snp_h200 without the user's VCEK cache, with an empty OCSP cache (the revocation path reads serial numbers)."""
    base = load_policy("snp_h200")
    return dataclasses.replace(base, cert_cache_dir=None, gpu=dataclasses.replace(
        base.gpu, ocsp_cache=str(tmp_path_factory.mktemp("ocsp"))))


def test_genuine_evidence_passes(real):
    for ev in (real["milan"], real["vlek"]):
        verdict = appraise(ev, AUTH, expected_report_data=None, now=NOW)
        assert verdict.ok, verdict.explain()


SLOTS = [("milan", "snp", i) for i in range(3)] + [("milan", "gpu", i) for i in range(5)] + [
    ("vlek", "snp", 0), ("turin", "snp", 0)]


def get(ev: Evidence, kind: str, i: int) -> bytes:
    return (ev.certificates if kind == "snp" else ev.gpus[0].certificates)[i]


def put(ev: Evidence, kind: str, i: int, data: bytes) -> Evidence:
    if kind == "snp":
        return dataclasses.replace(ev, certificates=ev.certificates[:i] + (data,) + ev.certificates[i + 1 :])
    return with_gpu(ev, certificates=ev.gpus[0].certificates[:i] + (data,) + ev.gpus[0].certificates[i + 1 :])


def with_gpu(ev: Evidence, **changes) -> Evidence:
    return dataclasses.replace(ev, gpus=(dataclasses.replace(ev.gpus[0], **changes),))


@st.composite
def byte_edit(draw, data: bytes) -> bytes:
    """A flip, overwrite, truncation, insertion or deletion."""
    pos = draw(st.integers(0, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    if kind == "set":
        return data[:pos] + bytes([draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF]))]) + data[pos + 1 :]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data[:pos] + data[pos + draw(st.integers(1, 16)) :]


@st.composite
def der_edit(draw, der: bytes) -> bytes:
    """A length field rewritten, an extension duplicated or an OID swapped (lengths redone around it)."""
    kind = draw(st.sampled_from(["length", "duplicate", "oid"]))
    if kind == "duplicate":
        count = len(children(value_at(der, EXTENSIONS)))
        return dup_extension(der, draw(st.integers(0, count - 1)), draw(st.integers(0, count)))
    if kind == "oid":
        paths = [p for p, _, tag, _ in nodes(der) if tag == 0x06]
        return at(der, draw(st.sampled_from(paths)), lambda t, v: draw(st.sampled_from(OIDS)))
    _, offset, tag, size = draw(st.sampled_from(list(nodes(der))))
    length = draw(st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\x80", b"\x81\x00", b"\x81\xff", b"\x82\xff\xff",
                                   b"\x84\xff\xff\xff\xff", b"\x89" + bytes(9)]))
    return der[:offset] + bytes([tag]) + length + der[offset + size :]


@st.composite
def pem_edit(draw, der: bytes) -> bytes:
    """PEM text of the certificate, damaged: edited bytes, a missing END line, a doubled BEGIN, junk around it."""
    text = pem(der)
    kind = draw(st.sampled_from(["bytes", "no_end", "double_begin", "junk", "bad_base64", "der_edit"]))
    if kind == "bytes":
        return draw(byte_edit(text))
    if kind == "no_end":
        return text[: text.index(b"-----END")]
    if kind == "double_begin":
        return text.replace(b"\n", b"\n-----BEGIN CERTIFICATE-----\n", 1)
    if kind == "junk":
        return draw(st.binary(max_size=16)) + text + draw(st.binary(min_size=1, max_size=16))
    if kind == "bad_base64":
        pos = draw(st.integers(28, len(text) - 27))
        return text[:pos] + draw(st.sampled_from([b"!", b"=", b"====", b"\x00", b"\xff"])) + text[pos:]
    return pem(draw(der_edit(der)))


def mutation(der: bytes):
    return st.one_of(byte_edit(der), der_edit(der), pem_edit(der))


def assert_verdicts(ev: Evidence, *policies):
    """appraise answers a Verdict under each policy, and malformed parts are named by position and type only."""
    for policy in policies:
        verdict = appraise(ev, policy, expected_report_data=None, now=NOW)
        assert verdict.checks and not (verdict.ok and policy is not AUTH)  # strict: no binding was given
        if policy is AUTH:  # --hypothesis-show-statistics: how the mutations fared
            event(re.sub(r"\d+", "N", verdict.failures()[0].name) if not verdict.ok else "accepted")
        for c in verdict.failures():
            if c.name.endswith(".certificates"):
                assert FORMAT_TEXT.fullmatch(c.actual), c.actual


@FUZZ
@given(data=st.data(), slot=st.sampled_from(SLOTS))
def test_mutated_certificates_give_verdicts(real, strict, data, slot):
    name, kind, i = slot
    ev = real[name]
    assert_verdicts(put(ev, kind, i, data.draw(mutation(get(ev, kind, i)))), AUTH, strict)


@settings(FUZZ, max_examples=200)
@given(data=st.data(), part=st.sampled_from(["snp", "spdm"]))
def test_mutated_reports_give_verdicts(real, strict, data, part):
    ev = real["milan"]
    if part == "snp":
        ev = dataclasses.replace(ev, snp_report=data.draw(byte_edit(ev.snp_report)))
    else:
        ev = with_gpu(ev, report=data.draw(byte_edit(ev.gpus[0].report)))
    assert_verdicts(ev, AUTH, strict)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_mutated_certificate_tables_give_verdicts_or_format_errors(real, data):
    vcek, ask, ark = real["milan"].certificates
    blob = data.draw(byte_edit(build_cert_table({"vcek": vcek, "ask": ask, "ark": ark})))
    try:
        certificates = certificates_from_table(blob)
    except ValueError as exc:
        assert type(exc).__name__ == "EvidenceFormatError" and str(exc).startswith("certificate table: ")
        event("certificate table format error")
        return
    assert_verdicts(dataclasses.replace(real["milan"], certificates=certificates), AUTH)


DRIVER_RIM = f"{SAMPLES}/Driver_RIM_test_no_gpu.swidtag"
RIM_TIME = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)  # inside the test RIM signer's validity
X509_ELEMENT = re.compile(rb"(<ds:X509Certificate>)([^<]*)(</ds:X509Certificate>)")


@pytest.fixture(scope="module")
def rim_store(vectors, tmp_path_factory):
    pytest.importorskip("signxml", reason="signxml is not installed: RIM verification needs the 'nvidia' extra")
    store = tmp_path_factory.mktemp("rims")
    (store / "rim_root.pem").write_bytes((vectors / "nvidia/nvtrust/roots/verifier_RIM_root.pem").read_bytes())
    return store


@settings(FUZZ, max_examples=100)
@given(data=st.data(), target=st.sampled_from(["file", "signer certificate"]))
def test_mutated_rims_fail_rim_checks(vectors, real, strict, rim_store, data, target):
    rim = (vectors / DRIVER_RIM).read_bytes()
    if target == "file":
        rim = data.draw(byte_edit(rim))
    else:
        signer = X509_ELEMENT.search(rim)
        bad = data.draw(mutation(base64.b64decode(b"".join(signer.group(2).split()))))
        rim = rim[: signer.start(2)] + base64.b64encode(bad) + rim[signer.end(2) :]
    (rim_store / "driver.swidtag").write_bytes(rim)
    policy = dataclasses.replace(strict, gpu=dataclasses.replace(
        strict.gpu, rim_store=str(rim_store), require_rim_match=True, revocation=Revocation.off))
    verdict = appraise(real["milan"], policy, expected_report_data=None, now=RIM_TIME)
    rim = [c for c in verdict.checks if ".rim." in c.name]
    event(next((c.name for c in rim if not c.ok), "accepted"))
    assert rim and not verdict.ok  # the test RIMs never match this H100 (see the vectors' README)


@pytest.fixture(scope="module")
def files(real, tmp_path_factory):
    """The genuine evidence as the files `medtee attest verify` reads."""
    d = tmp_path_factory.mktemp("evidence")
    milan, vlek = real["milan"], real["vlek"]
    (d / "report.bin").write_bytes(milan.snp_report)
    (d / "vlek-report.bin").write_bytes(vlek.snp_report)
    (d / "gpu.txt").write_text(milan.gpus[0].report.hex())
    for name, der in zip(("vcek.der", "ask.der", "ark.der"), milan.certificates):
        (d / name).write_bytes(der)
    return d


def cli_args(real, files, slot, data: bytes) -> tuple[list[str], str]:
    """`attest verify` arguments with the slot's certificate replaced by `data` in a file of its own, and that file."""
    name, kind, i = slot
    mutated = files / f"mutated-{name}-{kind}{i}"
    if kind == "gpu":
        chain = [pem(c) for c in real["milan"].gpus[0].certificates]
        chain[i] = data if b"-----BEGIN" in data else pem(data)
        mutated.write_bytes(b"".join(chain))
        return ["--gpu-report", str(files / "gpu.txt"), "--gpu-certs", str(mutated)], str(mutated)
    mutated.write_bytes(data)
    if name == "vlek":
        return ["--snp-report", str(files / "vlek-report.bin"), "--snp-cert", str(mutated)], str(mutated)
    certs = [str(files / n) for n in ("vcek.der", "ask.der", "ark.der")][: 1 if name == "turin" else 3]
    certs[i] = str(mutated)
    return ["--snp-report", str(files / "report.bin")] + [a for c in certs for a in ("--snp-cert", c)], str(mutated)


@settings(FUZZ, max_examples=250)
@given(data=st.data(), slot=st.sampled_from(SLOTS))
def test_cli_on_mutated_certificates_exits_cleanly(real, files, data, slot):
    name, kind, i = slot
    argv, mutated = cli_args(real, files, slot, data.draw(mutation(get(real[name], kind, i))))
    rc, _, err = verify(*argv, "--at", NOW.isoformat(), "--policy", "authenticity")
    event(f"exit {rc}")
    assert rc != 2 or mutated in err


@pytest.mark.slow
@pytest.mark.parametrize("slot, case", [(("milan", "snp", 0), "DuplicateExtension"),
                                        (("milan", "gpu", 2), "UnsupportedAlgorithm")])
def test_cli_subprocess_exits_2_without_traceback(real, files, slot, case):
    name, kind, i = slot
    argv, mutated = cli_args(real, files, slot, CASES[case][0](get(real[name], kind, i)))
    res = subprocess.run([sys.executable, "-m", "medtee", "attest", "verify", *argv, "--policy", "authenticity"],
                         capture_output=True, text=True, timeout=120)
    block = f"PEM block {i + 1}: " if kind == "gpu" else ""
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == f"medtee: attest verify: {mutated}: {block}malformed X.509 certificate ({case})\n"
