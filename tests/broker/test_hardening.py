"""The HTTP broker under attack, each finding of the review reproduced on 127.0.0.1 (raw sockets where HTTP itself is
abused): body framing and limits, smuggling, timeouts, idle connections, challenge floods, audit growth, hostile
evidence, invalid ids and deep JSON; and a fuzz that no client input gets a 500."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medtee.broker.protocol import ChallengeRefused
from medtee.broker.server import Limits
from medtee.broker.service import EmbeddedBroker
from medtee.crypto.hpke import EphemeralKey
from medtee.sealing.seal import seal_records

from .conftest import RECIPE, call, exchange, make_records, raw_request, simulated_evidence

pytestmark = pytest.mark.slow
SMUGGLED = raw_request("GET", "/v1/public-key", headers={})


def _statuses(answer: bytes) -> list[int]:
    return [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]


def _release_doc(server, manifest, **changes) -> dict:
    """A well-formed release request for `manifest` on a fresh nonce, with `changes` applied."""
    status, body = call(server, "/v1/challenge", {"dataset_id": manifest.dataset_id})
    assert status == 200, body
    nonce, eph = base64.b64decode(body["nonce"]), EphemeralKey.generate()
    doc = {"dataset_id": manifest.dataset_id, "nonce": body["nonce"],
           "evidence": simulated_evidence()(nonce, eph.public_bytes).to_json(),
           "ephemeral_public_key": base64.b64encode(eph.public_bytes).decode(), "recipe_digest": RECIPE,
           "manifest_digest": manifest.digest()}
    return {**doc, **changes}


def _audit_lines(broker) -> list[str]:
    return (broker.store_dir / "audit.log").read_text().splitlines()


@pytest.mark.parametrize("headers, status", [
    ({"Content-Length": "-1"}, 400),
    ({"Content-Length": "12x"}, 400),
    ({"Content-Length": "5", "Transfer-Encoding": "chunked"}, 400),
    ({"Content-Length": str(10 ** 9)}, 413),
])
def test_bad_or_too_large_declared_length_is_refused_up_front(serve, sealed, headers, status):
    server = serve()
    started = time.monotonic()
    answer = exchange(server, raw_request("POST", "/v1/challenge", headers=headers) + b"x" * 1000)
    assert _statuses(answer) == [status] and not answer.endswith(b"<still open>")
    assert time.monotonic() - started < 0.9  # answered without waiting for (or reading) the body


def test_streamed_body_over_the_limit_is_cut_off(serve, sealed):
    chunk = b"8000\r\n" + b"a" * 0x8000 + b"\r\n"
    answer = exchange(serve(), raw_request("POST", "/v1/challenge", headers={"Transfer-Encoding": "chunked"})
                      + chunk * 4)
    assert _statuses(answer) == [413] and not answer.endswith(b"<still open>")


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/nope", 404),  # answered without reading the body
    ("GET", "/v1/release", 405),
    ("POST", "/v1/challenge", 400),  # the body is read: not JSON
])
def test_an_unread_body_is_never_parsed_as_a_request(serve, sealed, method, path, status):
    answer = exchange(serve(), raw_request(method, path, SMUGGLED))
    assert _statuses(answer) == [status] and b"public_key" not in answer
    pipelined = exchange(serve(), raw_request("GET", "/v1/health", headers={}) * 2)  # keep-alive still works
    assert _statuses(pipelined) == [200, 200]


def test_stalled_or_cut_requests_are_closed_within_the_timeouts(serve, sealed):
    server = serve()
    head = raw_request("POST", "/v1/challenge", headers={"Content-Length": "100"})
    for data, statuses in [(head + b'{"dataset', [408]),  # headers, then a stalled body
                           (head[:30], []),  # headers that never end
                           (b"", [])]:  # a connection that sends nothing
        started = time.monotonic()
        answer = exchange(server, data, wait=6)
        assert _statuses(answer) == statuses and not answer.endswith(b"<still open>"), data
        assert time.monotonic() - started < 4, data
    assert call(server, "/v1/health") == (200, {"ok": True})


def test_idle_connections_hold_no_threads_and_are_closed(serve, sealed):
    import socket

    server = serve()
    assert call(server, "/v1/health")[0] == 200
    before = threading.active_count()
    conns = [socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) for _ in range(300)]
    try:
        time.sleep(0.3)
        assert threading.active_count() <= before + 1
        deadline = time.monotonic() + 5
        for conn in conns:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            assert conn.recv(1) == b""  # closed by the broker after idle_timeout_s
    finally:
        for conn in conns:
            conn.close()
    assert call(server, "/v1/health")[0] == 200


def test_one_address_cannot_hold_every_connection(serve, sealed):
    """256 kept-alive connections from one address used to leave every other client a 503."""
    import socket

    server = serve(Limits(idle_timeout_s=5, max_connections=8, max_connections_per_client=3))
    conns = [socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) for _ in range(6)]
    try:
        time.sleep(0.3)
        for conn in conns[3:]:  # closed at once, long before the idle timeout
            conn.settimeout(2)
            assert conn.recv(1) == b""
        for conn in conns[:3]:
            conn.settimeout(0.2)
            with pytest.raises(TimeoutError):
                conn.recv(1)  # still open
        assert call(server, "/v1/health", source="127.0.0.2")[0] == 200  # another address is served
    finally:
        for conn in conns:
            conn.close()
    time.sleep(0.2)
    assert call(server, "/v1/health")[0] == 200  # once its connections close, the address is served again


def test_challenge_floods_are_contained_per_dataset_and_per_client(serve, sealed, broker, tmp_path):
    seal_records(make_records(2), tmp_path / "other", broker=broker, policy="simulated", dataset_id="other")
    server = serve(max_challenges_per_dataset=6, max_challenges_per_client=4)
    ask = lambda source, dataset="test-ds", **kw: call(server, "/v1/challenge", {"dataset_id": dataset},  # noqa: E731
                                                        source=source, **kw)
    assert [ask("127.0.0.2")[0] for _ in range(4)] == [200] * 4
    status, body = ask("127.0.0.2", headers={"X-Forwarded-For": "10.9.8.7"})  # a forged address changes nothing
    assert status == 429 and "client 127.0.0.2" in body["error"]
    assert ask("127.0.0.2", "other")[0] == 429
    assert [ask("127.0.0.3")[0] for _ in range(2)] == [200] * 2
    status, body = ask("127.0.0.1")
    assert status == 429 and "dataset test-ds" in body["error"]
    assert ask("127.0.0.1", "other")[0] == 200  # the other dataset is not denied


def test_expired_challenges_are_pruned(sealed, broker):
    now = [0.0]
    broker = EmbeddedBroker(broker.store_dir, nonce_ttl_s=10, max_challenges_per_dataset=3,
                            clock=lambda: now[0])
    for _ in range(3):
        broker.challenge("test-ds")
    with pytest.raises(ChallengeRefused, match="retry in 10 s"):
        broker.challenge("test-ds")
    now[0] = 10.5
    broker.challenge("test-ds")
    assert len(broker._nonces) == 1 and dict(broker._per_client) == {"local": 1}


def test_malformed_releases_are_audited_with_bounded_fields_and_spend_the_nonce(serve, sealed, broker):
    _, manifest, _, _ = sealed
    server = serve(Limits())  # the default 4 MiB body limit
    big = "a" * 3_000_000
    cases = [{"recipe_digest": big}, {"manifest_digest": "F" * 64}, {"ephemeral_public_key": big},
             {"evidence": {"provider": big, "snp_report": "AAAA"}}, {big[:1_000_000]: 1}]
    for changes in cases:
        before = _audit_lines(broker)
        doc = _release_doc(server, manifest, **changes)
        status, body = call(server, "/v1/release", doc)
        assert status == 400 and len(body["error"]) < 1000
        [entry] = _audit_lines(broker)[len(before):]
        assert len(entry) < 1024 and json.loads(entry)["failed"] == ["broker.request"]
        status, body = call(server, "/v1/release", _release_doc(server, manifest, nonce=doc["nonce"]))
        assert status == 403 and body["verdict"]["checks"][0]["actual"] == "already used or expired"
    before = _audit_lines(broker)
    status, _ = call(server, "/v1/release", _release_doc(server, manifest, manifest_digest="0" * 64))  # denied
    assert status == 403
    [entry] = _audit_lines(broker)[len(before):]
    assert json.loads(entry)["manifest_digest"] == "0" * 64 and len(entry) < 1024
    for doc in ({"dataset_id": "nope", "nonce": big}, {"dataset_id": big, "nonce": "x"}):  # no known dataset
        assert call(server, "/v1/release", doc)[0] == 400
    assert len(_audit_lines(broker)) == len(before) + 1


def test_refused_registrations_of_a_registered_dataset_are_audited(serve, sealed, broker):
    _, manifest, _, _ = sealed
    server = serve()
    doc = json.loads(manifest.to_json())
    before = len(_audit_lines(broker))
    assert call(server, "/v1/datasets", {"dataset_id": "test-ds", "x": "y" * 10_000})[0] == 400  # malformed
    assert call(server, "/v1/datasets", {**doc, "signature": base64.b64encode(bytes(64)).decode()})[0] == 400
    assert call(server, "/v1/datasets", {**doc, "dataset_id": "unknown-ds"})[0] == 400  # names no registered dataset
    entries = [json.loads(line) for line in _audit_lines(broker)[before:]]
    assert [(e["event"], e["dataset_id"], e["reason"], e["owner_key"]) for e in entries] == [
        ("refuse-register", "test-ds", "SealedDataError", "(invalid)"),
        ("refuse-register", "test-ds", "SealedDataError", manifest.owner_key_id())]


def test_answers_never_name_the_brokers_store(serve, sealed, tmp_path):
    """A 404 for an unknown dataset used to give the store's path on the broker's host, as did a 403 for a manifest
    signed by an owner the broker does not trust."""
    from medtee.broker.server import BrokerServer

    _, manifest, _, _ = sealed
    status, body = call(serve(), "/v1/challenge", {"dataset_id": "nope"})
    assert status == 404
    assert body["error"] == "dataset nope is not registered with this broker; seal it against this broker"
    stranger = EmbeddedBroker(tmp_path / "stranger")  # trusts no owner
    server = BrokerServer(stranger, "127.0.0.1", 0, limits=Limits(), quiet=True)
    try:
        status, body = call(server, "/v1/datasets", json.loads(manifest.to_json()))
    finally:
        server.close()
    assert status == 403 and "does not trust" in body["error"] and "trusted-owners/" in body["error"]
    assert str(tmp_path) not in json.dumps(body)


def test_a_malformed_certificate_is_a_denial(serve, sealed, broker, monkeypatch):
    _, manifest, _, _ = sealed
    server = serve()
    broker.set_policy("test-ds", "snp_h100")  # hardware evidence: its certificates are parsed
    doc = _release_doc(server, manifest)
    doc["evidence"] = {**doc["evidence"], "simulated": False, "certificates": [base64.b64encode(b"\x30\x82junk").decode()]}
    entries = len(_audit_lines(broker))
    status, body = call(server, "/v1/release", doc)
    assert status == 403 and not body["verdict"]["ok"] and body["verdict"]["checks"]
    assert len(_audit_lines(broker)) == entries + 1
    assert call(server, "/v1/release", doc)[1]["verdict"]["checks"][0]["name"] == "broker.nonce"  # spent

    def verifier_crash(*_args, **_kwargs):
        raise ValueError("PARSER-INTERNALS " + "x" * 10_000)

    monkeypatch.setattr("medtee.attestation.appraise", verifier_crash)
    status, body = call(server, "/v1/release", _release_doc(server, manifest))
    assert status == 403
    assert [(c["name"], c["actual"]) for c in body["verdict"]["checks"]] == [("broker.evidence", "ValueError")]
    assert "PARSER-INTERNALS" not in (broker.store_dir / "audit.log").read_text()


@pytest.mark.parametrize("path, body", [
    ("/v1/challenge", {"dataset_id": "../../etc/passwd"}),
    ("/v1/challenge", {"dataset_id": "a" * 5000}),
    ("/v1/challenge", {"dataset_id": 7}),
    ("/v1/challenge", {"dataset_id": "test-ds", "extra": 1}),
    ("/v1/challenge", [[[[[[[[[[[[[[[[[["test-ds"]]]]]]]]]]]]]]]]]]),
    ("/v1/release", {"dataset_id": "../../etc/passwd"}),
    ("/v1/datasets", {"dataset_id": "../x", "format_version": 2}),
])
def test_invalid_ids_and_deep_json_are_400(serve, sealed, path, body):
    status, answer = call(serve(), path, body)
    assert status == 400 and "etc/passwd" not in answer["error"]


def test_deeply_nested_raw_json_is_400(serve, sealed):
    server = serve()
    for path in ("/v1/challenge", "/v1/release", "/v1/datasets"):
        status, body = call(server, path, b"[" * 60_000)
        assert status == 400 and "nested" in body["error"]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                     max_leaves=12)


def test_no_client_input_gets_a_500(serve, sealed):
    _, manifest, _, _ = sealed
    server = serve()
    valid = {"/v1/release": _release_doc(server, manifest), "/v1/datasets": json.loads(manifest.to_json()),
             "/v1/challenge": {"dataset_id": "test-ds"}}

    @settings(max_examples=150, deadline=None)
    @given(data=st.data())
    def fuzz(data):
        path = data.draw(st.sampled_from(sorted(valid)))
        doc = json.loads(json.dumps(valid[path]))
        for key in data.draw(st.lists(st.sampled_from(sorted(doc)), max_size=3)):
            doc[key] = data.draw(_JSON)
        if isinstance(doc.get("evidence"), dict) and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(["provider", "simulated", "snp_report", "certificates", "gpus"]))
            doc["evidence"][key] = data.draw(_JSON)
        status, body = call(server, path, data.draw(st.one_of(st.just(doc), _JSON)))
        assert status in (200, 201, 400, 403, 404), (status, body)

    fuzz()
