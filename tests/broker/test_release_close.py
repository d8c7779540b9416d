"""Release records, the receipt key in the release, and closing a release (embedded and over HTTP)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from medtee.attestation import report_data
from medtee.attestation.simulated import SimulatedProvider
from medtee.broker import audit
from medtee.broker.client import HttpBroker
from medtee.broker.protocol import (
    MAX_CLOSE_RECORD_BYTES,
    KeyReleaseDenied,
    Release,
    ReleaseClosedError,
    RequestError,
    UnknownReleaseError,
    obtain_data_key,
    parse_release_request,
    CloseNotAuthorized,
    close_message,
    record_digest,
)
from medtee.crypto.secret import SecretBuffer
from medtee.sealing.reader import open_dataset

from .conftest import RECIPE, call, simulated_evidence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

RECEIPT_PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
RECEIPT_KEY = RECEIPT_PRIVATE.public_key().public_bytes_raw()
TEARDOWN = {"wiped": ["data_key", "checkpoint_key"], "temp_files_removed": 3, "note": "TEARDOWN-MARKER"}


def receipt_bound(receipt_key: bytes = RECEIPT_KEY):
    """Simulated evidence whose REPORT_DATA binds `receipt_key` too (no GPUs)."""
    def collect(nonce: bytes, eph: bytes):
        return SimulatedProvider().collect(report_data(nonce=nonce, ephemeral_public_key=eph, recipe_digest=RECIPE,
                                                       receipt_public_key=receipt_key))
    return collect


def release(client, manifest, **kwargs) -> Release:
    kwargs = {"evidence_for": receipt_bound(), "receipt_public_key": RECEIPT_KEY, **kwargs}
    return obtain_data_key(client, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                           recipe_digest=RECIPE, **kwargs)


def signed(release_id: str, record: dict, private=RECEIPT_PRIVATE) -> dict:
    """The arguments that close `release_id`: the receipt key and its signature of the close message."""
    return {"record": record, "receipt_public_key": private.public_key().public_bytes_raw(),
            "signature": private.sign(close_message(release_id, record))}


def close_body(release_id: str, record: dict, private=RECEIPT_PRIVATE) -> dict:
    args = signed(release_id, record, private)
    return {"release_id": release_id, "record": record,
            "receipt_public_key": base64.b64encode(args["receipt_public_key"]).decode(),
            "signature": base64.b64encode(args["signature"]).decode()}


def entries(broker) -> list[dict]:
    return [json.loads(line) for line in (broker.store_dir / "audit.log").read_text().splitlines()]


def test_release_returns_its_audit_record_and_audits_the_receipt_key_id(sealed, broker):
    out, manifest, records, key = sealed
    got = release(broker, manifest)
    assert isinstance(got.data_key, SecretBuffer) and got.data_key == key
    assert "data_key" not in repr(got) and repr(got.data_key) == "SecretBuffer(32 bytes, hidden)"
    assert open_dataset(out).read_records(got.data_key) == records
    last = entries(broker)[-1]
    assert last["event"] == "release" and got.release_id == got.audit_entry_sha256 == last["hash"]
    assert last["hash"] == audit._entry_hash(last)
    assert last["receipt_key"] == hashlib.sha256(RECEIPT_KEY).hexdigest()
    assert got.nonce.hex().startswith(last["nonce"]) and len(got.ephemeral_public_key) > 0


def test_a_release_without_receipt_key_audits_none(sealed, broker):
    _, manifest, _, key = sealed
    got = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                          recipe_digest=RECIPE, evidence_for=simulated_evidence())
    assert got.data_key == key and "receipt_key" not in entries(broker)[-1]


@pytest.mark.parametrize("evidence_for, receipt_key", [
    (simulated_evidence(), RECEIPT_KEY),  # the evidence leaves the receipt key out
    (receipt_bound(), None),  # the broker is not told the key the evidence binds
    (receipt_bound(bytes(32)), RECEIPT_KEY),  # another key is bound
])
def test_receipt_key_must_match_the_binding(sealed, broker, evidence_for, receipt_key):
    _, manifest, _, _ = sealed
    with pytest.raises(KeyReleaseDenied) as err:
        release(broker, manifest, evidence_for=evidence_for, receipt_public_key=receipt_key)
    assert [c.name for c in err.value.verdict.failures()] == ["binding.report_data"]


def test_a_wrong_size_receipt_key_is_denied_and_audited_invalid(sealed, broker):
    _, manifest, _, _ = sealed
    with pytest.raises(KeyReleaseDenied, match="receipt_public_key"):
        release(broker, manifest, receipt_public_key=b"short")
    last = entries(broker)[-1]
    assert last["event"] == "deny" and last["receipt_key"] == "(invalid)" and last["failed"] == ["broker.request"]


def _request(manifest, **extra) -> dict:
    evidence = receipt_bound()(b"n" * 32, b"k" * 32)
    return {"dataset_id": manifest.dataset_id, "nonce": base64.b64encode(b"n" * 32).decode(),
            "evidence": evidence.to_json(), "ephemeral_public_key": base64.b64encode(b"k" * 32).decode(),
            "recipe_digest": RECIPE, "manifest_digest": manifest.digest(), **extra}


def test_release_request_parses_an_optional_32_byte_receipt_key(sealed):
    _, manifest, _, _ = sealed
    assert "receipt_public_key" not in parse_release_request(_request(manifest))
    fields = parse_release_request(_request(manifest, receipt_public_key=base64.b64encode(RECEIPT_KEY).decode()))
    assert fields["receipt_public_key"] == RECEIPT_KEY
    for bad in (base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode(), "not base64!", 7, None):
        with pytest.raises(RequestError, match="receipt_public_key must be base64 of 32 to 32 bytes") as err:
            parse_release_request(_request(manifest, receipt_public_key=bad))
        assert "dataset_id" in err.value.fields and "receipt_public_key" not in err.value.fields


def test_close_is_audited_with_ids_and_a_digest_only(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    close_hash = broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    last = entries(broker)[-1]
    assert last["hash"] == close_hash and last["event"] == "close"
    assert {k: last[k] for k in ("release_id", "dataset_id", "record_sha256")} == {
        "release_id": got.release_id, "dataset_id": manifest.dataset_id, "record_sha256": record_digest(TEARDOWN)}
    assert "TEARDOWN-MARKER" not in (broker.store_dir / "audit.log").read_text()
    assert audit.verify(broker.store_dir / "audit.log").ok


def test_unknown_and_double_closes_are_refused(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    with pytest.raises(UnknownReleaseError, match="no release"):
        broker.close_release("0" * 64, **signed("0" * 64, {}))
    deny_hash = next(e["hash"] for e in entries(broker) if e["event"] == "register")
    with pytest.raises(UnknownReleaseError):  # an audit entry that is not a release
        broker.close_release(deny_hash, **signed(deny_hash, {}))
    broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    n = len(entries(broker))
    with pytest.raises(ReleaseClosedError, match="already closed"):
        broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    assert len(entries(broker)) == n  # a refused close appends nothing


@pytest.mark.parametrize("release_id, record, word", [
    ("A" * 64, {}, "release_id"), ("ab", {}, "release_id"), ("0" * 64, [], "record"),
    ("0" * 64, {"x": float("nan")}, "record"), ("0" * 64, {"x": object()}, "record"),
    ("0" * 64, {"x": "y" * MAX_CLOSE_RECORD_BYTES}, "record"),
])
def test_malformed_closes_are_refused(broker, release_id, record, word):
    with pytest.raises(RequestError, match=word):
        broker.close_release(release_id, record=record, receipt_public_key=RECEIPT_KEY, signature=bytes(64))


@pytest.mark.slow
def test_close_over_http(sealed, broker, serve, tmp_path):
    _, manifest, _, _ = sealed
    server = serve()
    client = HttpBroker(server.url, store_dir=tmp_path / "unused")
    got = release(client, manifest)
    assert got.release_id == entries(broker)[-1]["hash"]
    assert client.close_release(got.release_id, **signed(got.release_id, TEARDOWN)) == entries(broker)[-1]["hash"]
    with pytest.raises(ReleaseClosedError):
        client.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    with pytest.raises(UnknownReleaseError):
        client.close_release("1" * 64, **signed("1" * 64, {}))
    other = release(broker, manifest)  # released by another broker instance over the same store
    status, body = call(server, "/v1/release/close", close_body(other.release_id, {"n": 1}))
    assert status == 200 and body == {"release_id": other.release_id, "audit_entry_sha256": entries(broker)[-1]["hash"]}
    assert call(server, "/v1/release/close", close_body(other.release_id, {}))[0] == 409
    forged = release(broker, manifest)
    status, body = call(server, "/v1/release/close", close_body(forged.release_id, {}, Ed25519PrivateKey.generate()))
    assert status == 403 and "receipt key" in body["error"]


@pytest.mark.slow
@pytest.mark.parametrize("doc, word", [
    ({"release_id": "0" * 64}, "missing field"), ({**close_body("0" * 64, {}), "x": 1}, "unknown field"),
    ({**close_body("0" * 64, {}), "record": "text"}, "record must be a JSON object"),
    ({**close_body("0" * 64, {}), "release_id": "zz"}, "release_id must be 64 lowercase hex"), ([], "must be a JSON object"),
    ({**close_body("0" * 64, {}), "record": {"x": "y" * MAX_CLOSE_RECORD_BYTES}}, "at most"),
    ({**close_body("0" * 64, {}), "signature": base64.b64encode(b"s" * 63).decode()}, "signature must be base64 of 64"),
    ({**close_body("0" * 64, {}), "receipt_public_key": "!"}, "receipt_public_key must be base64"),
])
def test_malformed_close_bodies_are_400(serve, doc, word):
    status, body = call(serve(), "/v1/release/close", doc)
    assert status == 400 and word in body["error"]


@pytest.mark.parametrize("who", ["another key", "a signature of another record", "a release without receipt key"])
def test_only_the_releases_receipt_key_closes_it(sealed, broker, who):
    """A close is the attested process's own record: anyone else who learns a release id cannot write it."""
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    if who == "another key":
        args = signed(got.release_id, TEARDOWN, Ed25519PrivateKey.generate())
    elif who == "a signature of another record":
        args = {**signed(got.release_id, {"other": 1}), "record": TEARDOWN}
    else:
        got = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                              recipe_digest=RECIPE, evidence_for=simulated_evidence())
        args = signed(got.release_id, TEARDOWN)
    n = len(entries(broker))
    with pytest.raises(CloseNotAuthorized, match="receipt key"):
        broker.close_release(got.release_id, **args)
    assert len(entries(broker)) == n
    if who != "a release without receipt key":
        broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))  # its own key still can
