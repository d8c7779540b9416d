"""Receipts end to end: build, sign, verify; tampering, unbound keys, real SNP evidence, offline, standard DSSE."""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import socket
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medtee.attestation import Evidence, load_policy
from medtee.broker.protocol import Release
from medtee.crypto.secret import SecretBuffer
from medtee.receipt.signing import ReceiptSigner, key_id, write_receipt
from medtee.receipt.statement import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE
from medtee.receipt.verify import UnusableInput, verify_receipt

from .conftest import statement_for

VLEK = ("snp/trustee/snp/test-vlek-report.bin", "snp/trustee/snp/test-vlek.der")
VLEK_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)


def vector_policy():
    """A site's non-production policy the real VLEK vector meets (a receipt is never verified under authenticity)."""
    from medtee.attestation.policy import RUN_MODES, RecipeRules

    return dataclasses.replace(load_policy("authenticity"), name="vector-site", authenticity_only=False,
                               recipe=RecipeRules(modes=list(RUN_MODES), min_aggregate=1))


def envelope(run) -> dict:
    return json.loads(run.receipt.read_bytes())


def encoded(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def failed(result) -> list[str]:
    return [c.name for c in result.failures()]


def with_payload(doc: dict, payload: bytes) -> dict:
    return {**doc, "payload": base64.b64encode(payload).decode()}


def test_receipt_verifies_under_its_recorded_simulated_policy(run):
    result = verify_receipt(run.receipt.read_bytes(), files=[run.adapter])
    assert result.ok, result.failures()
    assert [c.name for c in result.checks] == ["signature", "binding", "attestation", "authenticity", "policy",
                                               "recipe.digest", f"file {run.adapter}"]
    assert result.simulated and result.policy == "simulated"
    assert next(c for c in result.checks if c.name == "authenticity").reason.startswith("SIMULATED:")


def test_statement_shape(run):
    statement = json.loads(base64.b64decode(envelope(run)["payload"]))
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert envelope(run)["payloadType"] == PAYLOAD_TYPE
    assert [s["name"] for s in statement["subject"]] == ["recipe", "adapter.safetensors.enc"]
    p = statement["predicate"]
    assert p["simulated"] is True and p["authenticity"].startswith("SIMULATED:")
    assert p["release"]["release_id"] == run.release.release_id
    assert p["binding"]["receipt_key_id"] == run.signer.key_id == envelope(run)["signatures"][0]["keyid"]
    assert p["run"]["outcome"] == "done" and p["run"]["error_type"] is None
    assert p["attestation"]["policy"]["content"]["allow_simulated"] is True
    assert len(p["medtee"]["source_digest"]) == 64


def test_a_failed_run_records_only_the_exception_type(run):
    statement = statement_for(Evidence.from_json(run.statement["predicate"]["attestation"]["evidence"]), run.release,
                              run.signer, adapter=run.adapter, error=RuntimeError("PHI-marker patient text"))
    payload = run.signer.sign(statement)["payload"]
    assert b"PHI-marker" not in base64.b64decode(payload)
    assert statement["predicate"]["run"] == {**statement["predicate"]["run"], "outcome": "failed",
                                             "error_type": "RuntimeError"}


def test_production_policy_rejects_a_simulated_receipt_loudly(run):
    result = verify_receipt(run.receipt.read_bytes(), files=[run.adapter], policy=load_policy("snp_h200"))
    assert not result.ok and {"authenticity", "attestation"} <= set(failed(result))
    assert "SIMULATED" in next(c for c in result.checks if c.name == "authenticity").reason
    assert "evidence.simulated" in next(c for c in result.checks if c.name == "attestation").reason


@pytest.mark.parametrize("position", [0, 1, 31, 32, 63])
def test_any_changed_signature_byte_fails_the_signature(run, position):
    doc = envelope(run)
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[position] ^= 0x01
    doc["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    assert failed(verify_receipt(encoded(doc))) == ["signature"]


@pytest.mark.parametrize("old, new, also", [
    (b'"test-ds"', b'"test-dt"', []),  # the dataset id
    (b'"train/loss":2.5', b'"train/loss":2.4', []),  # a metric
    (b'"temp_files_removed":2', b'"temp_files_removed":3', []),  # the teardown record
    (b'"rank":4', b'"rank":8', ["recipe.digest"]),  # the recipe
    (b'"outcome":"done"', b'"outcome":"fail"', None),  # not an outcome: unusable
])
def test_a_changed_payload_fails_the_signature(run, old, new, also):
    doc = envelope(run)
    payload = base64.b64decode(doc["payload"])
    assert payload.count(old) == 1
    tampered = encoded(with_payload(doc, payload.replace(old, new)))
    if also is None:
        with pytest.raises(UnusableInput, match="outcome"):
            verify_receipt(tampered)
        return
    assert failed(verify_receipt(tampered)) == ["signature", *also]


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.4, 0.6, 0.8, 0.98])
def test_any_flipped_payload_byte_is_never_accepted(run, fraction):
    doc = envelope(run)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[int(len(payload) * fraction)] ^= 0x01
    try:
        result = verify_receipt(encoded(with_payload(doc, bytes(payload))))
    except UnusableInput:
        return  # unreadable after the flip: refused as unusable input
    assert "signature" in failed(result)


def test_a_changed_evidence_byte_fails_signature_and_attestation(run):
    doc = envelope(run)
    statement = json.loads(base64.b64decode(doc["payload"]))
    report = bytearray(base64.b64decode(statement["predicate"]["attestation"]["evidence"]["snp_report"]))
    report[0x60] ^= 0x01  # inside REPORT_DATA
    statement["predicate"]["attestation"]["evidence"]["snp_report"] = base64.b64encode(report).decode()
    result = verify_receipt(encoded(with_payload(doc, json.dumps(statement).encode())))
    assert {"signature", "binding", "attestation"} <= set(failed(result))


@pytest.mark.parametrize("position", [0, 100, 2047])
def test_a_changed_adapter_byte_fails_naming_the_file(run, position):
    data = bytearray(run.adapter.read_bytes())
    data[position] ^= 0xFF
    run.adapter.write_bytes(data)
    result = verify_receipt(run.receipt.read_bytes(), files=[run.adapter])
    assert failed(result) == [f"file {run.adapter}"]
    assert "matches no subject" in result.failures()[0].reason


def test_a_receipt_signed_by_a_key_not_bound_into_the_evidence_fails_binding(run):
    other = ReceiptSigner()
    evidence = Evidence.from_json(run.statement["predicate"]["attestation"]["evidence"])
    statement = statement_for(evidence, run.release, other, adapter=run.adapter)
    result = verify_receipt(encoded(other.sign(statement)), files=[run.adapter])
    assert failed(result) == ["binding"]
    assert "not bound" in result.failures()[0].reason


def test_a_receipt_naming_one_key_but_signed_by_another_fails_the_signature(run):
    from securesystemslib.dsse import Envelope

    env = Envelope(base64.b64decode(envelope(run)["payload"]), PAYLOAD_TYPE, {})
    env.sign(ReceiptSigner()._signer)  # a stranger signs the run's statement (sign() itself would refuse)
    assert failed(verify_receipt(encoded(env.to_dict()))) == ["signature"]


def vector_run(vectors, run, policy=None):
    """A receipt carrying real SEV-SNP evidence (whose REPORT_DATA binds no medtee key), signed by a fresh key,
    recording `policy` (default: vector_policy())."""
    signer = ReceiptSigner()
    evidence = Evidence(provider="file", snp_report=(vectors / VLEK[0]).read_bytes(),
                        certificates=((vectors / VLEK[1]).read_bytes(),))
    release = Release(data_key=SecretBuffer(), release_id="0" * 64, audit_entry_sha256="0" * 64,
                      nonce=b"n" * 32, ephemeral_public_key=b"k" * 32)
    statement = statement_for(evidence, release, signer, adapter=run.adapter, policy=policy or vector_policy())
    return write_receipt(signer.sign(statement), run.dir)


def test_real_snp_evidence_in_a_receipt_fails_binding_only(vectors, run):
    result = verify_receipt(vector_run(vectors, run).read_bytes(), files=[run.adapter], policy=vector_policy(),
                            now=VLEK_TIME)
    assert failed(result) == ["binding"] and not result.simulated
    passed = {c.name for c in result.verdict.checks if c.ok}
    assert {"amd.chain", "snp.signature", "amd.vlek.validity"} <= passed


def test_verification_needs_no_network(vectors, run, monkeypatch):
    receipt = run.receipt.read_bytes()
    real = vector_run(vectors, run).read_bytes()

    def refuse(*args, **kwargs):
        raise OSError("network use during receipt verification")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert verify_receipt(receipt, files=[run.adapter]).ok
    assert failed(verify_receipt(real, policy=vector_policy(), now=VLEK_TIME)) == ["binding"]


def test_no_receipt_verifies_under_an_authenticity_only_policy(vectors, run):
    """A receipt from any genuine SNP guest, DEBUG included, used to print VERIFIED under 'authenticity' by default."""
    data = vector_run(vectors, run, policy=load_policy("authenticity")).read_bytes()
    for policy in (None, load_policy("authenticity")):
        with pytest.raises(UnusableInput, match="checks only that evidence is genuine.*pass the release policy"):
            verify_receipt(data, policy=policy, now=VLEK_TIME)


def test_the_envelope_verifies_with_a_standard_dsse_verifier(run):
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    doc = envelope(run)
    public = Ed25519PublicKey.from_public_bytes(run.signer.public_bytes)
    key = SSlibKey.from_crypto(public, key_id(run.signer.public_bytes), "ed25519")
    assert list(Envelope.from_dict(doc).verify([key], 1)) == [key.keyid]
    # and by the DSSE v1 spec's PAE, independently of securesystemslib
    payload, ptype = base64.b64decode(envelope(run)["payload"]), PAYLOAD_TYPE.encode()
    pae = b"DSSEv1 %d %b %d %b" % (len(ptype), ptype, len(payload), payload)
    public.verify(base64.b64decode(envelope(run)["signatures"][0]["sig"]), pae)


@pytest.mark.parametrize("data, word", [
    (b"\xff not json", "not a JSON"), (b"[]", "not a DSSE envelope"), (b'{"payload": "x"}', "not a DSSE envelope"),
    (b'{"payload": "!!", "payloadType": "x", "signatures": []}', "malformed DSSE"),
])
def test_unusable_input_is_distinct_from_rejection(data, word):
    with pytest.raises(UnusableInput, match=word):
        verify_receipt(data)


def test_wrong_payload_type_or_statement_is_unusable(run):
    doc = envelope(run)
    with pytest.raises(UnusableInput, match="payloadType"):
        verify_receipt(encoded({**doc, "payloadType": "application/json"}))
    statement = json.loads(base64.b64decode(doc["payload"]))
    for change, word in [({"predicateType": "https://example.com/other"}, "predicateType"),
                         ({"_type": "x"}, "in-toto Statement"),
                         ({"predicate": {k: v for k, v in statement["predicate"].items() if k != "binding"}},
                          "predicate.binding")]:
        with pytest.raises(UnusableInput, match=word):
            verify_receipt(encoded(with_payload(doc, json.dumps({**statement, **change}).encode())))


def test_the_signer_keeps_its_key_to_itself(run):
    signer = run.signer
    assert len(signer.public_bytes) == 32 and signer.key_id[:16] in repr(signer)
    assert not any(hasattr(signer, name) for name in ("private_bytes", "private_key", "__dict__"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
    with pytest.raises(ValueError, match="another receipt_public_key"):
        ReceiptSigner().sign(run.statement)


def test_a_receipt_cannot_bring_its_own_policy(run, tmp_path):
    """Without --policy the verifier appraises under its own shipped policy of the recorded name, never the content
    the receipt records: a forged receipt recording a lax policy under a production name fails."""
    import base64
    import json

    from medtee.receipt.signing import ReceiptSigner
    from medtee.receipt.verify import UnusableInput

    envelope = json.loads(run.receipt.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    signer = ReceiptSigner()
    statement["predicate"]["binding"]["receipt_public_key"] = base64.b64encode(signer.public_bytes).decode()
    for name, outcome in (("snp_h200", "rejected"), ("my_own_policy", "unusable")):
        forged = json.loads(json.dumps(statement))
        forged["predicate"]["attestation"]["policy"]["name"] = name  # the content still allows simulated evidence
        data = json.dumps(signer.sign(forged)).encode()
        if outcome == "unusable":
            with pytest.raises(UnusableInput, match="pass the policy you trust"):
                verify_receipt(data)
            continue
        result = verify_receipt(data)
        failed = {c.name for c in result.failures()}
        assert not result.ok and {"authenticity", "policy"} <= failed, failed


def test_the_policy_recipe_rules_apply_to_a_receipt(run):
    """An auditor's policy that approves only other recipes rejects the receipt (its recorded recipe is checked)."""
    from medtee.attestation.policy import RecipeRules

    mine = dataclasses.replace(load_policy("simulated"), name="site-dev", recipe=RecipeRules(digests=["cd" * 32]))
    result = verify_receipt(run.receipt.read_bytes(), files=[run.adapter], policy=mine)
    assert "attestation" in failed(result) and "policy.recipe.digest" in {c.name for c in result.verdict.failures()}
