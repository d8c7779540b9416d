"""Load and abuse on 127.0.0.1 against `medtee broker serve` in its own process: 128 legitimate releases (64 at a
time) succeed while malformed, oversized, slow, idle and replayed requests are refused, and the broker's threads and
memory stay bounded. Bounded in count and time."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medtee.broker.audit import verify
from medtee.broker import connect
from medtee.broker.service import EmbeddedBroker
from medtee.sealing.seal import seal_records

from .conftest import make_records, raw_request, release_once, replayed

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LEGIT, CONCURRENCY, IDLE = 128, 64, 100
MAX_THREADS = 16 + 8  # Limits.worker_threads, plus the main, server and interpreter threads
MAX_RSS_GROWTH = 50 << 20


def _proc_stats(pid: int) -> tuple[int, int]:
    """(threads, resident bytes) of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return len(os.listdir(f"/proc/{pid}/task")), rss_kib << 10


def _raw(port: int, data: bytes, *, body: bytes = b"", stall: bool = False, timeout: float = 15) -> bytes:
    """Send `data` (then `body` in pieces, ignoring a reset); `stall` keeps the connection open without sending more.
    Returns what the server answered before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            for i in range(0, len(body), 1 << 16):
                s.sendall(body[i:i + (1 << 16)])
        except OSError:
            pass
        received = b""
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except OSError:
            pass
        return received


def _status(answer: bytes) -> int:
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_load_and_abuse_are_bounded(tmp_path):
    store = tmp_path / "store"
    # --store: the old spelling of --broker-dir still works
    proc = subprocess.Popen([sys.executable, "-m", "medtee", "broker", "serve", "--port", "0", "--store", str(store),
                             "--idle-timeout", "2", "--body-timeout", "2",
                             "--max-connections-per-client", "256"],  # every client here is 127.0.0.1
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        url = proc.stdout.readline().split()[-1]
        port = int(url.rsplit(":", 1)[1])
        client = connect(url, store_dir=store)
        manifest = seal_records(make_records(3), tmp_path / "ds", broker=client, policy="simulated", dataset_id="busy")
        expected = EmbeddedBroker(store).unwrap_data_key(manifest)

        def legit(_):
            return release_once(client, manifest)

        for i in range(4):  # warm up: imports, worker threads
            legit(i)
        threads0, rss0 = _proc_stats(proc.pid)
        peak = [threads0, rss0]
        done = threading.Event()

        def sample():
            while not done.wait(0.05):
                threads, rss = _proc_stats(proc.pid)
                peak[:] = [max(peak[0], threads), max(peak[1], rss)]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        nonce = base64.b64encode(os.urandom(32)).decode()
        malformed = [raw_request("POST", "/v1/challenge", b"{not json"),
                     raw_request("POST", "/v1/challenge", b"[" * 100_000),
                     raw_request("POST", "/v1/challenge", b'{"dataset_id": "../../etc/passwd"}'),
                     raw_request("POST", "/v1/challenge", b'{"dataset_id": "%s"}' % (b"a" * 5000)),
                     raw_request("POST", "/v1/release", b'{"dataset_id": "busy", "nonce": "%s", "recipe_digest": "%s"}'
                                 % (nonce.encode(), b"f" * 3_000_000)),
                     raw_request("POST", "/v1/nope", raw_request("GET", "/v1/public-key", headers={})),
                     raw_request("POST", "/v1/challenge", headers={"Content-Length": "-1"})]
        abuse = ([lambda m=m: _status(_raw(port, m)) for m in malformed] * 8
                 + [lambda: _status(_raw(port, raw_request("POST", "/v1/release",
                                                           headers={"Content-Length": str(10 << 20)})))] * 16
                 + [lambda: _status(_raw(port, raw_request("POST", "/v1/release",
                                                           headers={"Transfer-Encoding": "chunked"}),
                                         body=(b"10000\r\n" + b"a" * 0x10000 + b"\r\n") * 72))] * 4
                 + [lambda: _status(_raw(port, raw_request("POST", "/v1/release", headers={"Content-Length": "900"})
                                         + b'{"dataset_id"', stall=True))] * 16)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as abusers, ThreadPoolExecutor(max_workers=CONCURRENCY) as clients:
            abused = [abusers.submit(fn) for fn in abuse]
            results = list(clients.map(legit, range(LEGIT)))
            statuses = [f.result() for f in abused]
        assert all(key == expected for key, _ in results)
        allowed = ([{400}] * 4 + [{400, 503}, {404}, {400}]) * 8 + [{413}] * 16 + [{413, 503}] * 4 + [{408}] * 16
        assert all(status in ok for status, ok in zip(statuses, allowed, strict=True)), statuses  # 503: memory cap
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:  # 0 replays accepted
            assert list(pool.map(lambda r: replayed(client, r), [r for _, r in results])) == [["broker.nonce"]] * LEGIT
        elapsed = time.monotonic() - started
        for conn in idle:  # every idle connection was closed by the broker
            conn.settimeout(5)
            assert conn.recv(1) == b""
            conn.close()
        done.set()
        sampler.join()
        threads, rss = _proc_stats(proc.pid)
        assert peak[0] <= MAX_THREADS, peak
        assert peak[1] - rss0 < MAX_RSS_GROWTH, (peak[1] - rss0) >> 20
        assert elapsed < 40
        assert client.public_key() == EmbeddedBroker(store).public_key()  # still serving
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert verify(store / "audit.log").ok
    events = Counter(json.loads(line)["event"] for line in (store / "audit.log").read_text().splitlines())
    assert events["register"] == 1 and events["release"] == 4 + LEGIT
    assert LEGIT <= events["deny"] <= LEGIT + 8  # the replays, and the malformed releases not refused for memory
