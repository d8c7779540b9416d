"""NVIDIA H100 SPDM evidence against the vectors in ../shared/vectors/nvidia."""

import dataclasses
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from medtee.attestation import GpuEvidence, load_policy
from medtee.attestation.policy import Revocation
from medtee.attestation.nvidia import SpdmFormatError, gpu_evidence_checks, parse_hex_report, parse_spdm

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
AUTH = load_policy("authenticity")
SAMPLE = ("nvidia/nvtrust/local_gpu_verifier_samples/hopperAttestationReport.txt",
          "nvidia/nvtrust/local_gpu_verifier_samples/hopperCertChain.txt")
COCO = ("nvidia/trustee/hopper_coco_report1.txt", "nvidia/trustee/hopper_coco_certs1.txt")


def gpu(vectors, report, chain) -> GpuEvidence:
    certs = x509.load_pem_x509_certificates((vectors / chain).read_bytes())
    return GpuEvidence(report=parse_hex_report((vectors / report).read_text()),
                       certificates=tuple(c.public_bytes(Encoding.DER) for c in certs))


def failed(checks):
    return {c.name for c in checks if not c.ok}


@pytest.mark.parametrize("pair", [SAMPLE, COCO], ids=["nvtrust", "coco"])
def test_real_h100_reports_verify(vectors, pair):
    checks = gpu_evidence_checks(gpu(vectors, *pair), AUTH, expected_nonce=None, now=NOW)
    assert not failed(checks), checks
    assert {"gpu.chain", "gpu.fwid", "gpu.signature"} <= {c.name for c in checks}


def test_versions_extracted(vectors):
    spdm = parse_spdm(gpu(vectors, *SAMPLE).report)
    assert spdm.driver_version == "550.90.07" and spdm.vbios_version == "96.00.9F.00.01"
    assert len(spdm.measurements) == 64 and all(len(v) == 48 for v in spdm.measurements.values())
    assert parse_spdm(gpu(vectors, *COCO).report).driver_version == "580.95.05"


def test_coco_nonce_is_first_half_of_cpu_report_data(vectors):
    spdm = parse_spdm(gpu(vectors, *COCO).report)
    assert spdm.nonce.hex().startswith("87d8e24a")
    checks = gpu_evidence_checks(gpu(vectors, *COCO), AUTH, expected_nonce=spdm.nonce, now=NOW)
    assert not failed(checks)


def test_wrong_nonce_rejected(vectors):
    checks = gpu_evidence_checks(gpu(vectors, *SAMPLE), AUTH, expected_nonce=bytes(32), now=NOW)
    assert failed(checks) == {"gpu.nonce"}


@pytest.mark.parametrize("case, reasons", [
    (2, {"gpu.chain.length", "gpu.fwid", "gpu.signature"}),  # root only
    (3, {"gpu.chain"}),  # provisioner intermediate missing
    (4, {"gpu.fwid", "gpu.signature"}),  # leaf missing: every remaining link verifies
])
def test_broken_chains_fail_with_the_right_reason(vectors, case, reasons):
    ev = gpu(vectors, "nvidia/trustee/hopperAttestationReport.txt", f"nvidia/trustee/hopper_cert_chain_case{case}.txt")
    assert failed(gpu_evidence_checks(ev, AUTH, expected_nonce=None, now=NOW)) == reasons


def test_case1_chain_verifies(vectors):
    ev = gpu(vectors, "nvidia/trustee/hopperAttestationReport.txt", "nvidia/trustee/hopper_cert_chain_case1.txt")
    assert not failed(gpu_evidence_checks(ev, AUTH, expected_nonce=None, now=NOW))


@pytest.mark.parametrize("position", [0, 40, 200, 3000, -97, -1])
def test_flipped_byte_rejected(vectors, position):
    ev = gpu(vectors, *SAMPLE)
    raw = bytearray(ev.report)
    raw[position] ^= 0x01
    checks = gpu_evidence_checks(dataclasses.replace(ev, report=bytes(raw)), AUTH, expected_nonce=None, now=NOW)
    assert failed(checks)


def test_truncated_report_is_a_format_error(vectors):
    with pytest.raises(SpdmFormatError, match="truncated"):
        parse_spdm(gpu(vectors, *SAMPLE).report[:500])


def test_production_gpu_policy_needs_cc_on_and_devtools_off(vectors):
    policy = load_policy("snp_h200")
    ev = dataclasses.replace(gpu(vectors, *SAMPLE), cc_feature=True, devtools_mode=True)
    spdm = parse_spdm(ev.report)
    names = failed(gpu_evidence_checks(ev, policy, expected_nonce=spdm.nonce, now=NOW))
    assert "gpu.devtools" in names and "gpu.cc_mode" not in names
    assert "gpu.revocation" in names  # fail-closed and no ocsp_cache configured


def test_hex_parse_error_is_named():
    with pytest.raises(ValueError, match="not hex"):
        parse_hex_report("zz")


def test_the_board_is_read_from_the_signed_evidence_and_pinned_by_gpu_boards(vectors):
    """H100 and H200 share the GH100 chip and its certificates: gpu.boards is what tells the cards apart."""
    ev = dataclasses.replace(gpu(vectors, *SAMPLE), cc_feature=True, devtools_mode=False)
    spdm = parse_spdm(ev.report)
    assert spdm.board == "1010-0200-882"
    base = load_policy("snp_h100")
    for boards, ok in (([], True), (["1010-0200-882"], True), (["1010-0210-882"], False)):
        policy = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, boards=boards, revocation=Revocation.off))
        (board,) = [c for c in gpu_evidence_checks(ev, policy, expected_nonce=spdm.nonce, now=NOW)
                    if c.name == "gpu.board"]
        assert board.ok is ok and board.actual == "1010-0200-882"
