"""The HTTP key broker (uvicorn) on 127.0.0.1: the same contract as the embedded one, under 64 concurrent releases."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medtee.broker.client import BrokerError, HttpBroker
from medtee.broker import connect
from medtee.broker.protocol import KeyReleaseDenied, UnknownDatasetError, obtain_data_key
from medtee.broker.server import BrokerServer, Limits, client_key
from medtee.broker.service import EmbeddedBroker
from medtee.crypto.hpke import EphemeralKey
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import seal_records

from .conftest import RECIPE, make_records, release_once, replayed, simulated_evidence

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    with BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, quiet=True) as srv:
        yield srv


def test_seal_against_remote_broker_and_release(server, tmp_path):
    client = connect(server.url, store_dir=tmp_path / "broker")  # the data owner shares the server's store here
    assert isinstance(client, HttpBroker) and client.public_key() == server.broker.public_key()
    records = make_records(12)
    manifest = seal_records(records, tmp_path / "ds", broker=client, policy="simulated", dataset_id="remote-ds")
    assert server.broker.datasets() == ["remote-ds"]
    key = obtain_data_key(client, dataset_id="remote-ds", manifest_digest=manifest.digest(), recipe_digest=RECIPE,
                          evidence_for=simulated_evidence()).data_key
    assert open_dataset(tmp_path / "ds").read_records(key) == records


def test_remote_refusals(server, tmp_path):
    client = HttpBroker(server.url, store_dir=tmp_path / "owner-elsewhere")
    with pytest.raises(PermissionError, match="does not trust"):
        seal_records(make_records(2), tmp_path / "x", broker=client, policy="simulated")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnknownDatasetError, match="not registered"):
        client.challenge("nope")
    seal_records(make_records(2), tmp_path / "ds", broker=connect(server.url, store_dir=tmp_path / "broker"),
                 policy="simulated", dataset_id="d")
    manifest = open_dataset(tmp_path / "ds").manifest
    nonce = client.challenge("d")
    eph = EphemeralKey.generate()
    evidence = simulated_evidence("00" * 32)(nonce, eph.public_bytes)
    with pytest.raises(KeyReleaseDenied, match="binding.report_data") as err:
        client.release(dataset_id="d", nonce=nonce, evidence=evidence, ephemeral_public_key=eph.public_bytes,
                       recipe_digest=RECIPE, manifest_digest=manifest.digest())
    assert not err.value.verdict.ok and err.value.verdict.failures()[0].name == "binding.report_data"


def test_plain_http_only_on_loopback(tmp_path):
    with pytest.raises(ValueError, match="only on loopback"):
        HttpBroker("http://broker.hospital.example:8765", store_dir=tmp_path)
    HttpBroker("https://broker.hospital.example:8765", store_dir=tmp_path)
    HttpBroker("http://[::1]:8765", store_dir=tmp_path)


def test_64_concurrent_releases_all_succeed_and_every_replay_is_refused(tmp_path):
    # every client here is 127.0.0.1; a connection counts until the broker has seen its close, so allow for the lag
    limits = Limits(max_connections_per_client=256)
    with BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, quiet=True, limits=limits) as server:
        _concurrent_releases(server, tmp_path)


def _concurrent_releases(server, tmp_path):
    client = connect(server.url, store_dir=tmp_path / "broker")
    manifest = seal_records(make_records(3), tmp_path / "ds", broker=client, policy="simulated", dataset_id="busy")
    expected = server.broker.unwrap_data_key(manifest)

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda _: release_once(client, manifest), range(64)))
    assert all(key == expected for key, _ in results)

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert list(pool.map(lambda r: replayed(client, r), [r for _, r in results])) == [["broker.nonce"]] * 64
    from medtee.broker.audit import verify

    report = verify(server.broker.store_dir / "audit.log")
    assert report.ok and report.entries == 1 + 64 + 64


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_prints_url_then_accepts_and_stops_cleanly(tmp_path, stop):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "medtee", "broker", "serve", "--port", "0", "--broker-dir",
                             str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("medtee key broker listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert not url.endswith(":0")
        scheme, public = HttpBroker(url, store_dir=tmp_path / "store").public_key()
        assert public == EmbeddedBroker(tmp_path / "store").public_key()[1]
        proc.send_signal(stop)
        assert proc.wait(15) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(10)


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "medtee test broker")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    with BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, tls_cert=cert, tls_key=key,
                      quiet=True) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        assert srv._server.config.ssl.minimum_version >= ssl.TLSVersion.TLSv1_2
        client = connect(srv.url, store_dir=tmp_path / "broker", ca=cert)
        assert client.public_key() == srv.broker.public_key()
        with pytest.raises(BrokerError, match="unreachable"):  # not trusted without the CA bundle
            connect(srv.url, store_dir=tmp_path / "broker", timeout_s=5).public_key()
    with pytest.raises(OSError):  # a key that does not fit the certificate: refused before listening
        BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, tls_cert=cert, tls_key=cert)


def test_handshakes_count_against_the_connection_caps(tmp_path):
    """The caps used to count a TLS connection only once its handshake was done: one address holding any number of
    unfinished handshakes (each up to the handshake deadline) counted against nothing."""
    import socket

    cert, key = _self_signed(tmp_path)
    limits = Limits(handshake_timeout_s=30, max_connections=5, max_connections_per_client=3)
    with BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, tls_cert=cert, tls_key=key, limits=limits,
                      quiet=True) as srv:
        address = ("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        silent = [socket.create_connection(address) for _ in range(5)]  # none starts its handshake
        others = [socket.create_connection(address, source_address=(f"127.0.0.{n}", 0)) for n in (2, 3, 4)]
        try:
            for conn in silent[3:] + others[2:]:  # over the client's cap, then over the total: closed at once
                conn.settimeout(5)
                assert conn.recv(1) == b""
            for conn in silent[:3] + others[:2]:
                conn.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    conn.recv(1)  # still waiting for its handshake
        finally:
            for conn in silent + others:
                conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the broker sees the closes on its next loop turn
            try:
                assert connect(srv.url, store_dir=tmp_path / "broker", ca=cert).public_key() == srv.broker.public_key()
                break
            except BrokerError:
                time.sleep(0.05)
        else:
            pytest.fail("the broker did not serve again once the held connections closed")


def test_a_connection_dropped_unclosed_is_forgotten():
    """asyncio drops, unclosed, the socket of a connection whose transport it failed to make: that must not keep a
    slot of the client's cap for good."""
    import gc
    import socket

    from medtee.broker.server import _Listener

    plain = socket.create_server(("127.0.0.1", 0))
    listener = _Listener(plain.family, plain.type, plain.proto, fileno=plain.detach()).configure(
        Limits(max_connections_per_client=1))
    with listener, socket.create_connection(listener.getsockname()), socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        assert (listener._total, dict(listener._open)) == (1, {"127.0.0.1": 1})
        del conn
        gc.collect()
        assert (listener._total, dict(listener._open)) == (0, {})
        again, _ = listener.accept()  # the client's one slot is free again
        again.close()
        assert listener._total == 0


@pytest.mark.parametrize("host, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack listener's IPv4 client
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # one host's /64 is one client
    ("fe80::1%eth0", "fe80::/64"),
    (None, "-"),
])
def test_clients_are_counted_by_ipv4_address_or_ipv6_64(host, key):
    assert client_key(host) == key


def test_a_tls_handshake_never_completed_is_cut_off(tmp_path):
    """uvicorn sets no handshake deadline: asyncio's 60 s let a silent connection hold a descriptor that long."""
    import socket

    cert, key = _self_signed(tmp_path)
    limits = Limits(handshake_timeout_s=0.5)
    with BrokerServer(EmbeddedBroker(tmp_path / "broker"), "127.0.0.1", 0, tls_cert=cert, tls_key=key, limits=limits,
                      quiet=True) as srv:
        silent = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        silent.settimeout(5)  # well under asyncio's 60 s, well over the deadline
        try:
            assert silent.recv(1) == b""
        finally:
            silent.close()
        assert connect(srv.url, store_dir=tmp_path / "broker", ca=cert).public_key() == srv.broker.public_key()
