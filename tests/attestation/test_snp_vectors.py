"""SEV-SNP verification against the real vectors in ../shared/vectors/snp (README table)."""

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtee.attestation import Evidence, appraise, load_policy
from medtee.attestation.amd import CertCache
from medtee.attestation.policy import Revocation
from medtee.attestation.snp import REPORT_SIZE, SIGNED_END, SnpReport

README_ROWS = [
    ("snp/automata/report.bin", "snp/automata/vek_cert.der"),
    ("snp/go-sev-guest/attestation.bin", "snp/go-sev-guest/vcek.testcer"),
    ("snp/ms-confidential-sidecar/snp_report.bin", "snp/ms-confidential-sidecar/uvm_host_amd_certificate.pem"),
    ("snp/trustee/az-snp-vtpm/evidence-genoa.snp_report.bin", "snp/trustee/az-snp-vtpm/evidence-genoa.vcek.pem"),
    ("snp/trustee/az-snp-vtpm/evidence-v0.snp_report.bin", "snp/trustee/az-snp-vtpm/evidence-v0.vcek.pem"),
    ("snp/trustee/az-snp-vtpm/evidence-v1.snp_report.bin", "snp/trustee/az-snp-vtpm/evidence-v0.vcek.pem"),
    ("snp/trustee/az-snp-vtpm/evidence-v2.snp_report.bin", "snp/trustee/az-snp-vtpm/evidence-v2.vcek.der"),
    ("snp/trustee/az-snp-vtpm/hcl-report.snp_report.bin", "snp/trustee/az-snp-vtpm/vcek.pem"),
    ("snp/trustee/snp/test-report.bin", "snp/trustee/snp/test-vcek.der"),
    ("snp/trustee/snp/test-vlek-report.bin", "snp/trustee/snp/test-vlek.der"),
    ("snp/virtee-sev/report_milan.bin", "snp/virtee-sev/vcek_milan.der"),
]
VLEK_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)
AUTH = load_policy("authenticity")


def evidence(vectors: Path, report: str, cert: str) -> Evidence:
    return Evidence(provider="file", snp_report=(vectors / report).read_bytes(),
                    certificates=((vectors / cert).read_bytes(),))


def when(report: str):
    return VLEK_TIME if "vlek" in report else None


@pytest.mark.parametrize("report, cert", README_ROWS, ids=[r for r, _ in README_ROWS])
def test_genuine_pairs_verify_under_authenticity(vectors, report, cert):
    verdict = appraise(evidence(vectors, report, cert), AUTH, expected_report_data=None, now=when(report))
    assert verdict.ok, verdict.explain()
    names = {c.name for c in verdict.checks}
    assert {"amd.chain", "snp.signature", "amd.key_cert.snp_spl", "snp.reserved[0x330:0x4a0]"} <= names


def test_vlek_outside_validity_is_rejected(vectors):
    verdict = appraise(evidence(vectors, *README_ROWS[9]), AUTH, expected_report_data=None,
                       now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert [c.name for c in verdict.failures()] == ["amd.vlek.validity"]


def test_debug_report_fails_strict_policy_naming_debug(vectors):
    strict = dataclasses.replace(load_policy("snp_h200"), gpu_provider=None,
                                 gpu=dataclasses.replace(load_policy("snp_h200").gpu, required=False))
    ev = evidence(vectors, *README_ROWS[1])
    verdict = appraise(ev, strict, expected_report_data=SnpReport.parse(ev.snp_report).report_data)
    assert "policy.debug: expected DEBUG=0, got DEBUG=1" in verdict.explain()
    # genuine: of the AMD checks only the CRL fails, which this machine's cache does not hold
    assert [c.name for c in verdict.failures() if c.name.startswith(("amd.", "snp."))] == ["amd.revocation"]


def test_binding_mismatch_rejected(vectors):
    verdict = appraise(evidence(vectors, *README_ROWS[0]), AUTH, expected_report_data=bytes(64))
    assert [c.name for c in verdict.failures()] == ["binding.report_data"]


def test_lit_report_without_certificate_fails_cleanly(vectors):
    ev = Evidence(provider="file", snp_report=(vectors / "snp/lit-protocol/guest_report.bin").read_bytes())
    verdict = appraise(ev, AUTH, expected_report_data=None)
    assert [c.name for c in verdict.failures()] == ["amd.key_cert"]


@pytest.mark.parametrize("name", ["guest_report_bad_sig.bin", "guest_report_corrupt.bin"])
def test_lit_malformed_reports_fail_cleanly(vectors, name):
    ev = Evidence(provider="file", snp_report=(vectors / "snp/lit-protocol" / name).read_bytes(),
                  certificates=((vectors / "snp/automata/vek_cert.der").read_bytes(),))
    verdict = appraise(ev, AUTH, expected_report_data=None)
    assert [c.name for c in verdict.failures()] == ["snp.report.format"]


def test_lit_bad_signature_byte_is_caught_in_1184_bytes(vectors):
    # the negative vector alters byte 347 (and has one extra byte); cut to size it must still be rejected
    raw = (vectors / "snp/lit-protocol/guest_report_bad_sig.bin").read_bytes()[:REPORT_SIZE]
    good = (vectors / "snp/lit-protocol/guest_report.bin").read_bytes()
    assert raw != good
    ev = Evidence(provider="file", snp_report=raw)
    assert not appraise(ev, AUTH, expected_report_data=None).ok


def test_certificate_of_another_chip_rejected(vectors):
    # same product (Milan), another chip: signature and hwID fail
    ev = Evidence(provider="file", snp_report=(vectors / README_ROWS[0][0]).read_bytes(),
                  certificates=((vectors / "snp/virtee-sev/vcek_milan.der").read_bytes(),))
    failed = {c.name for c in appraise(ev, AUTH, expected_report_data=None).failures()}
    assert {"snp.signature", "amd.key_cert.hwid"} <= failed


def test_certificate_of_another_product_rejected(vectors):
    # a Milan v3 report with the Genoa VCEK
    ev = Evidence(provider="file", snp_report=(vectors / README_ROWS[4][0]).read_bytes(),
                  certificates=((vectors / README_ROWS[3][1]).read_bytes(),))
    failed = {c.name for c in appraise(ev, AUTH, expected_report_data=None).failures()}
    assert {"snp.signature", "amd.key_cert.product_name", "amd.chain"} <= failed


def test_supplied_intermediate_must_equal_pinned(vectors):
    genoa_ask = (vectors / "snp/amd_roots/canonical/SEV-Genoa.pem").read_bytes()
    report, cert = README_ROWS[0]
    ev = Evidence(provider="file", snp_report=(vectors / report).read_bytes(),
                  certificates=((vectors / cert).read_bytes(), genoa_ask))
    assert "amd.supplied.SEV-Genoa" in {c.name for c in appraise(ev, AUTH, expected_report_data=None).failures()}


def test_vcek_from_cache_directory(vectors, tmp_path):
    report, cert = README_ROWS[0]
    raw = (vectors / report).read_bytes()
    CertCache(tmp_path).put_vcek("Milan", SnpReport.parse(raw), (vectors / cert).read_bytes())
    policy = dataclasses.replace(AUTH, cert_cache_dir=str(tmp_path))
    verdict = appraise(Evidence(provider="file", snp_report=raw), policy, expected_report_data=None)
    assert verdict.ok, verdict.explain()


def test_kds_url_for_milan(vectors):
    report = SnpReport.parse((vectors / README_ROWS[0][0]).read_bytes())
    url = CertCache.kds_url("Milan", report)
    assert url.startswith("https://kdsintf.amd.com/vcek/v1/Milan/" + report.chip_id.hex() + "?blSPL=3&teeSPL=0")


@pytest.fixture(scope="module")
def genuine(vectors):
    return evidence(vectors, *README_ROWS[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.one_of(st.integers(0, SIGNED_END - 1), st.integers(0x2A0, 0x32F), st.integers(0x330, REPORT_SIZE - 1)),
       mask=st.integers(1, 255))
def test_any_flipped_byte_is_rejected(genuine, position, mask):
    raw = bytearray(genuine.snp_report)
    raw[position] ^= mask
    verdict = appraise(dataclasses.replace(genuine, snp_report=bytes(raw)), AUTH, expected_report_data=None)
    assert not verdict.ok


def _lenient(**changes):
    """snp_h200 on the CPU alone, its measurement pin and TCB floors off: only the fields under test decide."""
    base = load_policy("snp_h200")
    changes = {"min_tcb": dataclasses.replace(base.min_tcb, snp=0, microcode=0, bootloader=0),
               "min_tcb_by_product": {}, **changes}
    return dataclasses.replace(base, gpu_provider=None, gpu=dataclasses.replace(base.gpu, required=False),
                               min_firmware="0.0.0", vmpl=None, amd_revocation=Revocation.off, **changes)


def test_a_vlek_from_a_cloud_the_policy_does_not_name_is_rejected(vectors):
    report, cert = README_ROWS[9]
    ev = evidence(vectors, report, cert)
    data = SnpReport.parse(ev.snp_report)
    aws = "CN=cc-us-east-2.amazonaws.com"  # the cspID AMD wrote into this VLEK
    for csp_ids, ok in (([aws], True), (["CN=another-cloud.example"], False), ([], True)):
        policy = _lenient(vlek_csp_ids=csp_ids, measurements=[data.measurement.hex()])
        verdict = appraise(ev, policy, expected_report_data=data.report_data, now=VLEK_TIME)
        checks = {c.name: c for c in verdict.checks}
        assert ("policy.vlek_csp_id" in checks) == bool(csp_ids)
        if csp_ids:
            assert checks["policy.vlek_csp_id"].ok is ok and checks["policy.vlek_csp_id"].actual == aws
        assert verdict.ok is ok, verdict.explain()


def test_a_guest_launched_under_an_older_tcb_than_the_minimum_is_rejected(vectors):
    """REPORTED_TCB may be current while LAUNCH_TCB, the TCB the guest started under, is below the policy's floor."""
    genuine = evidence(vectors, *README_ROWS[0])
    raw = bytearray(genuine.snp_report)
    reported = SnpReport.parse(bytes(raw)).reported_tcb("Milan")
    raw[0x1F0 + 6] = reported.snp - 1  # Milan: SNP SPL in byte 6 of LAUNCH_TCB
    report = SnpReport.parse(bytes(raw))
    policy = _lenient(min_tcb=dataclasses.replace(load_policy("snp_h200").min_tcb, snp=reported.snp, microcode=0))
    checks = {c.name: c for c in appraise(dataclasses.replace(genuine, snp_report=bytes(raw)), policy,
                                          expected_report_data=report.report_data).checks}
    assert checks["policy.min_tcb.snp"].ok
    assert not checks["policy.launch_tcb.snp"].ok and checks["policy.launch_tcb.snp"].actual == str(reported.snp - 1)
    assert all(checks[f"policy.launch_tcb.{n}"].ok for n in ("bootloader", "tee", "microcode"))


@pytest.mark.parametrize("name", ["snp_h100", "snp_h200"])
def test_the_shipped_policies_hold_each_product_to_its_own_tcb_floor(vectors, name):
    """AMD numbers SVNs per product: genuine Genoa evidence (microcode SPL 84) meets the shipped Genoa floor but not
    Milan's (115), which still holds a Milan host; the failing check names the floor it used."""
    shipped = load_policy(name)
    genoa, milan = evidence(vectors, *README_ROWS[3]), evidence(vectors, *README_ROWS[0])

    def tcb_checks(ev, policy):
        report = SnpReport.parse(ev.snp_report)
        verdict = appraise(ev, policy, expected_report_data=report.report_data)
        return {c.name: c for c in verdict.checks if c.name.startswith(("policy.min_tcb", "policy.launch_tcb"))}

    for ev in (genoa, milan):
        checks = tcb_checks(ev, _lenient(min_tcb=shipped.min_tcb, min_tcb_by_product=shipped.min_tcb_by_product))
        assert len(checks) == 8 and all(c.ok for c in checks.values()), [str(c) for c in checks.values()]
    assert "min_tcb_by_product.Genoa" in tcb_checks(genoa, load_policy(name))["policy.min_tcb.microcode"].expected
    one_floor = tcb_checks(genoa, _lenient(min_tcb=shipped.min_tcb))  # Milan's floor for Genoa too: refused
    assert not one_floor["policy.min_tcb.microcode"].ok and one_floor["policy.min_tcb.microcode"].actual == "84"
    raised = dataclasses.replace(shipped.min_tcb_by_product["Genoa"], microcode=85)
    assert not tcb_checks(genoa, _lenient(min_tcb_by_product={"Genoa": raised}))["policy.min_tcb.microcode"].ok
    assert all(c.ok for c in tcb_checks(milan, _lenient(min_tcb_by_product={"Genoa": raised})).values())


def test_platform_flags_the_policy_requires_are_read_from_genuine_reports(vectors):
    """A Genoa host on Azure reports ECC and the memory-alias check (PLATFORM_INFO 0b100100); a Milan host (automata)
    reports only SMT. A policy requiring the alias check (BadRAM) admits the first and names what the second lacks."""
    genoa, milan = evidence(vectors, *README_ROWS[3]), evidence(vectors, *README_ROWS[0])
    assert SnpReport.parse(genoa.snp_report).platform_flags() == ["ecc", "alias_check_complete"]
    assert SnpReport.parse(milan.snp_report).platform_flags() == ["smt"]
    for ev, ok in ((genoa, True), (milan, False)):
        data = SnpReport.parse(ev.snp_report)
        policy = _lenient(require_platform=["ecc", "alias_check_complete"], measurements=[data.measurement.hex()])
        checks = {c.name: c for c in appraise(ev, policy, expected_report_data=data.report_data).checks}
        assert checks["policy.platform_info"].ok is ok
        assert checks["policy.platform_info"].expected == "set: ecc, alias_check_complete"
    assert "policy.platform_info" not in {c.name for c in appraise(milan, _lenient(), expected_report_data=None).checks}
    assert "set: smt" in appraise(milan, _lenient(require_platform=["ecc"]), expected_report_data=None).explain()


@pytest.mark.parametrize("flags, words", [(["ecc", "badram"], r"require_platform: unknown \['badram'\]; choose from "
                                                                 r"tsme, ecc, rapl_disabled"),
                                          (["smt"], "SMT is ruled out with allow_smt: false")])
def test_unknown_platform_flags_are_refused(flags, words):
    from medtee.attestation.policy import policy_from_mapping

    with pytest.raises(ValueError, match=words):
        policy_from_mapping({"name": "p", "require_platform": flags}, "p.yaml")
