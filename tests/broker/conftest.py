"""Fixtures of the broker tests: the sealing tests' broker store and sealed dataset, an HTTP broker over that store
on 127.0.0.1, and raw-HTTP helpers for the attacks."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from sealing.conftest import broker, make_records, sealed  # noqa: F401 (fixtures shared with tests/sealing)

from medtee.attestation import collect_evidence
from medtee.broker.protocol import KeyReleaseDenied, release_info
from medtee.broker.server import BrokerServer, Limits
from medtee.broker.service import EmbeddedBroker
from medtee.crypto.hpke import EphemeralKey

FAST = Limits(idle_timeout_s=1, body_timeout_s=1, max_body_bytes=64 << 10)
GET = object()  # `call` without a body
RECIPE = "ab" * 32


def simulated_evidence(recipe: str = RECIPE):
    """Evidence from the real simulated provider, bound as the TEE binds it."""
    return lambda nonce, eph: collect_evidence("simulated", None, nonce=nonce, ephemeral_public_key=eph, recipe_digest=recipe)


def release_once(client, manifest) -> tuple[bytes, dict]:
    """One whole release through `client` (simulated evidence): the data key, and the request that fetched it."""
    nonce = client.challenge(manifest.dataset_id)
    eph = EphemeralKey.generate()
    request = dict(dataset_id=manifest.dataset_id, nonce=nonce, evidence=simulated_evidence()(nonce, eph.public_bytes),
                   ephemeral_public_key=eph.public_bytes, recipe_digest=RECIPE, manifest_digest=manifest.digest())
    return eph.unwrap(client.release(**request)[0], info=release_info(manifest.dataset_id, nonce)), request


@pytest.fixture
def serve(broker):  # noqa: F811 (the shared fixture)
    """`serve(limits, **broker_options)` starts an HTTP broker over `broker`'s store; all stop after the test."""
    servers = []

    def start(limits: Limits = FAST, **options) -> BrokerServer:
        servers.append(BrokerServer(EmbeddedBroker(broker.store_dir, **options), "127.0.0.1", 0, limits=limits,
                                    quiet=True))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def port(server: BrokerServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request as bytes; `headers` (default: the Content-Length of `body`) set its framing."""
    headers = {"Host": "127.0.0.1", **({"Content-Length": len(body)} if headers is None else headers)}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def exchange(server: BrokerServer, data: bytes, *, wait: float = 5.0, source: str = "127.0.0.1") -> bytes:
    """Send `data` on a fresh connection and read until the server closes it; `<still open>` if it has not within
    `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port(server)), timeout=wait, source_address=(source, 0)) as s:
        s.sendall(data)
        received = b""
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except TimeoutError:
            received += b"<still open>"
        except ConnectionResetError:
            pass
        return received


def call(server: BrokerServer, path: str, doc: object = GET, *, source: str = "127.0.0.1",
         headers: dict | None = None) -> tuple[int, dict]:
    """POST `doc` (JSON, or bytes as they are; GET without one) from `source`: the status and the decoded answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port(server), timeout=30, source_address=(source, 0))
    try:
        body = None if doc is GET else doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        conn.request("GET" if doc is GET else "POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def replayed(client, request: dict) -> list[str] | str:
    """Send a release `request` again: the failed checks, or "released" if the broker accepted it."""
    try:
        client.release(**request)
    except KeyReleaseDenied as e:
        return [c.name for c in e.verdict.failures()]
    return "released"
