import dataclasses
import os

import pytest

from medtee.attestation import Evidence, appraise, get_provider, load_policy, report_data

RD = report_data(nonce=os.urandom(32), ephemeral_public_key=b"k" * 32, recipe_digest="sha256:01")


@pytest.fixture(scope="module")
def evidence():
    return get_provider("simulated").collect(RD)


def test_collect_warns_loudly(capsys):
    get_provider("simulated").collect(RD)
    assert capsys.readouterr().err.startswith("SIMULATED ATTESTATION:")


def test_simulated_evidence_passes_simulated_policy(evidence):
    verdict = appraise(evidence, load_policy("simulated"), expected_report_data=RD)
    assert verdict.ok and verdict.simulated and evidence.simulated, verdict.explain()
    assert "protects nothing" in verdict.explain()


def test_wrong_binding_fails(evidence):
    other = report_data(nonce=os.urandom(32), ephemeral_public_key=b"k" * 32, recipe_digest="sha256:01")
    verdict = appraise(evidence, load_policy("simulated"), expected_report_data=other)
    assert [c.name for c in verdict.failures()] == ["binding.report_data"]
    assert other.hex() in verdict.explain()


def test_missing_binding_fails_when_required(evidence):
    verdict = appraise(evidence, load_policy("simulated"), expected_report_data=None)
    assert not verdict.ok and "binding.report_data" in verdict.explain()


@pytest.mark.parametrize("name", ["snp_h200", "snp_h100"])
def test_production_policies_reject_simulated(evidence, name):
    verdict = appraise(evidence, load_policy(name), expected_report_data=RD)
    assert not verdict.ok
    assert "evidence.simulated: expected hardware evidence, got SIMULATED" in verdict.explain()


def test_authenticity_rejects_simulated(evidence):
    assert not appraise(evidence, load_policy("authenticity"), expected_report_data=RD).ok


def test_tampered_report_fails_signature(evidence):
    raw = bytearray(evidence.snp_report)
    raw[0x090] ^= 1  # MEASUREMENT
    bad = dataclasses.replace(evidence, snp_report=bytes(raw))
    verdict = appraise(bad, load_policy("simulated"), expected_report_data=RD)
    assert [c.name for c in verdict.failures()] == ["snp.signature"]


def test_evidence_json_roundtrip_and_digest(evidence):
    again = Evidence.from_json(evidence.to_json())
    assert again == evidence and again.digest() == evidence.digest() and evidence.digest().startswith("sha256:")


@pytest.mark.parametrize("doc, word", [
    ({"provider": "x", "snp_report": "***"}, "snp_report"),
    ({"provider": "", "snp_report": ""}, "provider"),
    ({"provider": "x", "snp_report": "", "gpus": [{"report": 3}]}, "gpus[0].report"),
])
def test_bad_evidence_json_is_named(doc, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        Evidence.from_json(doc)


def test_truncated_report_is_rejected_cleanly(evidence):
    verdict = appraise(dataclasses.replace(evidence, snp_report=evidence.snp_report[:100]), load_policy("simulated"),
                       expected_report_data=RD)
    assert not verdict.ok and verdict.failures()[0].name == "snp.report.format"
