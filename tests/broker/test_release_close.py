"""Release records, the receipt key in the release, and closing a release (embedded and over HTTP)."""

from __future__ import annotations

import base64
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from medtee.attestation import report_data
from medtee.attestation.simulated import SimulatedProvider
from medtee.broker import audit
from medtee.broker.audit import AuditLogDamaged
from medtee.broker.client import HttpBroker
from medtee.broker.protocol import (
    CLOSE_REFUSED,
    MAX_CLOSE_RECORD_BYTES,
    CloseNotAuthorized,
    KeyReleaseDenied,
    Release,
    ReleaseClosedError,
    RequestError,
    close_message,
    obtain_data_key,
    parse_release_request,
    record_digest,
)
from medtee.broker.service import EmbeddedBroker
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


CAUSES = ["unknown", "not a release", "no_receipt_key", "wrong_key", "bad_signature"]


def refused_close(broker, manifest, cause: str) -> tuple[str, dict]:
    """A release id and close arguments refused for `cause`; the audited reason is `cause` ("unknown" for an audit
    entry that is not a release)."""
    if cause == "unknown":
        return "0" * 64, signed("0" * 64, TEARDOWN)
    if cause == "not a release":
        register = next(e["hash"] for e in entries(broker) if e["event"] == "register")
        return register, signed(register, TEARDOWN)
    if cause == "no_receipt_key":
        got = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                              recipe_digest=RECIPE, evidence_for=simulated_evidence())
        return got.release_id, signed(got.release_id, TEARDOWN)
    got = release(broker, manifest)
    if cause == "wrong_key":
        return got.release_id, signed(got.release_id, TEARDOWN, Ed25519PrivateKey.generate())
    return got.release_id, {**signed(got.release_id, {"other": 1}), "record": TEARDOWN}  # bad_signature


def reason_of(cause: str) -> str:
    return "unknown" if cause == "not a release" else cause


@pytest.mark.parametrize("cause", CAUSES)
def test_every_refused_close_gets_the_same_answer_and_is_audited_with_its_cause(sealed, broker, cause):
    """Nobody without the release's receipt key learns whether a release id exists, bound a key, or is closed. A close
    naming no release is not appended: anyone can send those, and they would let an outsider grow the log."""
    _, manifest, _, _ = sealed
    release_id, args = refused_close(broker, manifest, cause)
    n = len(entries(broker))
    with pytest.raises(CloseNotAuthorized) as err:
        broker.close_release(release_id, **args, client="192.0.2.7")
    assert type(err.value) is CloseNotAuthorized and str(err.value) == CLOSE_REFUSED
    log = entries(broker)
    if reason_of(cause) == "unknown":  # it concerns no release: counted per client, never appended (anyone can)
        assert len(log) == n and broker._unaudited["close", "192.0.2.7"] == 1
        return
    assert len(log) == n + 1
    assert {k: v for k, v in log[-1].items() if k not in ("seq", "time", "prev", "hash")} == {
        "event": "close_refused", "release_id": release_id, "client": "192.0.2.7", "reason": reason_of(cause)}
    assert audit.verify(broker.store_dir / "audit.log").ok


def test_the_refusal_names_every_cause_and_the_fix():
    for part in ("no release", "without a receipt key", "not the key the release bound", "signature",
                 "sign close_message with the receipt key"):
        assert part in CLOSE_REFUSED


def test_a_closed_release_refuses_outsiders_as_an_unknown_one(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    for args in (signed(got.release_id, TEARDOWN, Ed25519PrivateKey.generate()),
                 {**signed(got.release_id, {"other": 1}), "record": TEARDOWN}):
        with pytest.raises(CloseNotAuthorized) as err:  # not ReleaseClosedError: that would say it exists
            broker.close_release(got.release_id, **args)
        assert str(err.value) == CLOSE_REFUSED
    assert [e["reason"] for e in entries(broker)[-2:]] == ["wrong_key", "bad_signature"]


def test_a_retried_close_returns_the_same_hash_and_appends_nothing(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    first = broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    n = len(entries(broker))
    again = EmbeddedBroker(broker.store_dir)  # e.g. the broker restarted in between
    assert again.close_release(got.release_id, **signed(got.release_id, dict(reversed(TEARDOWN.items())))) == first
    assert len(entries(broker)) == n


def test_another_record_after_the_close_is_refused_as_closed_to_the_key_holder_only(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    first = broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    with pytest.raises(ReleaseClosedError, match="closed already, with another teardown record"):
        broker.close_release(got.release_id, **signed(got.release_id, {"other": 1}), client="192.0.2.8")
    last = entries(broker)[-1]
    assert (last["event"], last["reason"], last["client"]) == ("close_refused", "closed", "192.0.2.8")
    assert [e["hash"] for e in entries(broker) if e["event"] == "close"] == [first]
    assert broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN)) == first  # still idempotent


def test_refused_attempts_never_stop_the_legitimate_close(sealed, broker):
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    attempts = [signed(got.release_id, TEARDOWN, Ed25519PrivateKey.generate()),
                {**signed(got.release_id, {"other": 1}), "record": TEARDOWN},
                {**signed(got.release_id, TEARDOWN), "signature": bytes(64)}]
    for args in attempts:
        with pytest.raises(CloseNotAuthorized):
            broker.close_release(got.release_id, **args)
    close_hash = broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    log = entries(broker)
    assert [e["event"] for e in log[-4:]] == ["close_refused"] * 3 + ["close"] and log[-1]["hash"] == close_hash
    assert log[-1]["record_sha256"] == record_digest(TEARDOWN)
    assert audit.verify(broker.store_dir / "audit.log").ok


def test_concurrent_closes_close_a_release_once(sealed, broker):
    """Brokers over one store (separate locks, one audit file): one close entry; the same record always gets its
    hash, another record is refused as closed."""
    _, manifest, _, _ = sealed
    got = release(broker, manifest)
    brokers = [EmbeddedBroker(broker.store_dir) for _ in range(4)]

    def close(i: int):
        record = TEARDOWN if i % 2 else {"attempt": i}
        try:
            return brokers[i % 4].close_release(got.release_id, **signed(got.release_id, record))
        except ReleaseClosedError:
            return "409"

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(close, range(32)))
    closes = [e for e in entries(broker) if e["event"] == "close"]
    assert len(closes) == 1
    winner = closes[0]["record_sha256"]
    for i, answer in enumerate(answers):
        record = TEARDOWN if i % 2 else {"attempt": i}
        assert answer == (closes[0]["hash"] if record_digest(record) == winner else "409"), i
    assert audit.verify(broker.store_dir / "audit.log").ok


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
    first = client.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    assert first == entries(broker)[-1]["hash"]
    n = len(entries(broker))
    assert client.close_release(got.release_id, **signed(got.release_id, TEARDOWN)) == first  # a retry
    assert len(entries(broker)) == n
    with pytest.raises(ReleaseClosedError, match="closed already"):
        client.close_release(got.release_id, **signed(got.release_id, {"other": 1}))
    with pytest.raises(CloseNotAuthorized, match="refused to close release 1111111111111111") as err:
        client.close_release("1" * 64, **signed("1" * 64, {}))
    assert CLOSE_REFUSED in str(err.value)
    other = release(broker, manifest)  # released by another broker instance over the same store
    status, body = call(server, "/v1/release/close", close_body(other.release_id, {"n": 1}))
    assert status == 200 and body == {"release_id": other.release_id, "audit_entry_sha256": entries(broker)[-1]["hash"]}
    assert call(server, "/v1/release/close", close_body(other.release_id, {"n": 1})) == (200, body)
    assert call(server, "/v1/release/close", close_body(other.release_id, {}))[0] == 409
    assert call(server, "/v1/release/close", close_body(other.release_id, {}, Ed25519PrivateKey.generate())) == (
        403, {"error": CLOSE_REFUSED})


@pytest.mark.slow
def test_every_refused_close_over_http_is_the_same_403_and_audited_with_the_client(sealed, broker, serve):
    _, manifest, _, _ = sealed
    server = serve()
    answers = []
    for cause in CAUSES:
        release_id, args = refused_close(broker, manifest, cause)
        answers.append(call(server, "/v1/release/close", {
            "release_id": release_id, "record": args["record"],
            "receipt_public_key": base64.b64encode(args["receipt_public_key"]).decode(),
            "signature": base64.b64encode(args["signature"]).decode()}, source="127.0.0.2"))
        last = entries(broker)[-1]
        if reason_of(cause) == "unknown":  # not appended (see above)
            assert last["event"] != "close_refused" or last["release_id"] != release_id
            continue
        assert (last["event"], last["release_id"], last["client"], last["reason"]) == (
            "close_refused", release_id, "127.0.0.2", reason_of(cause))
    assert answers == [(403, {"error": CLOSE_REFUSED})] * len(CAUSES)
    assert audit.verify(broker.store_dir / "audit.log").ok


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
    with pytest.raises(CloseNotAuthorized, match="receipt key"):
        broker.close_release(got.release_id, **args)
    assert "close" not in [e["event"] for e in entries(broker)]
    if who != "a release without receipt key":
        broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))  # its own key still can


def test_a_served_broker_whose_log_was_rolled_back_answers_503_and_logs_why(sealed, broker, serve, tmp_path, capfd):
    """Restored from an older copy under a running server, the log refuses every decision with one 503 that names
    no file; the server's own log says what to restore."""
    from medtee.broker.client import BrokerError

    _, manifest, _, _ = sealed
    server = serve()
    client = HttpBroker(server.url, store_dir=tmp_path / "unused")
    log = broker.store_dir / "audit.log"
    older = log.read_bytes()
    got = release(client, manifest)
    log.write_bytes(older)
    capfd.readouterr()
    with pytest.raises(BrokerError, match="503.*records no decision until its owner restores its audit log"):
        release(client, manifest)
    status, body = call(server, "/v1/release/close", close_body(got.release_id, {"n": 1}))
    assert (status, body) == (503, {"error": "the broker records no decision until its owner restores its audit log"})
    assert "audit.log does not hold entry" in capfd.readouterr().err


def test_brokers_on_one_store_see_each_others_releases_and_closes(sealed, broker):
    """Each broker keeps an index of the log and catches up on what another appended (`medtee broker serve` beside
    the owner's commands, or a second server on the store) before every decision."""
    _, manifest, _, _ = sealed
    other = EmbeddedBroker(broker.store_dir)
    other.audit.append("warm")  # `other` has read the log before the release below
    got = release(broker, manifest)
    first = other.close_release(got.release_id, **signed(got.release_id, TEARDOWN))  # released by `broker`
    assert broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN)) == first
    with pytest.raises(ReleaseClosedError):
        broker.close_release(got.release_id, **signed(got.release_id, {"other": 1}))


def test_a_log_restored_from_a_copy_is_read_again(sealed, broker, tmp_path):
    """A broker's index must follow the file: restored from an earlier copy (and the loss accepted by removing the
    high-water mark, which refuses it until then), the releases after it are gone."""
    _, manifest, _, _ = sealed
    log, mark = broker.store_dir / "audit.log", broker.store_dir / "audit.log.mark"
    copy = log.read_bytes()
    got = release(broker, manifest)
    broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    log.write_bytes(copy)  # the same file (inode), shorter
    with pytest.raises(AuditLogDamaged, match="does not hold entry"):
        broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    mark.unlink()
    with pytest.raises(CloseNotAuthorized):  # the release is no longer in the log: unknown
        broker.close_release(got.release_id, **signed(got.release_id, TEARDOWN))
    again = release(broker, manifest)
    longer = log.read_bytes()
    restored = [json.loads(line) for line in longer.splitlines()]
    third = release(broker, manifest)  # the index now holds `third`
    size = len(log.read_bytes()) - len(longer) - 1

    def stand_in(pad: str) -> bytes:  # chained where `third` was, of another event
        entry = {"seq": restored[-1]["seq"] + 1, "time": "t", "event": "other", "pad": pad, "prev": again.release_id}
        return json.dumps({**entry, "hash": audit._entry_hash(entry)}, sort_keys=True).encode()

    log.write_bytes(longer + stand_in("x" * (size - len(stand_in("")))) + b"\n")  # same length, other entry
    assert len(log.read_bytes()) == len(longer) + size + 1
    with pytest.raises(AuditLogDamaged, match="does not hold entry .* though it has entries up to"):
        broker.close_release(third.release_id, **signed(third.release_id, TEARDOWN))
    mark.unlink()
    with pytest.raises(CloseNotAuthorized):  # read again from the start: `third` is gone
        broker.close_release(third.release_id, **signed(third.release_id, TEARDOWN))
    log.write_bytes(longer)
    mark.unlink()  # that decision recorded mark-start: `longer` lacks it
    assert broker.close_release(again.release_id, **signed(again.release_id, TEARDOWN))
    assert restored[-1]["hash"] == again.release_id
