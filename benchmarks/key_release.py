"""Key-release round trip (embedded and HTTP on loopback) and HTTP broker throughput under concurrency.

Uses SIMULATED attestation evidence (the appraisal path is the real one). Prints milliseconds per release and
releases per second; the last line is the concurrent throughput relative to one sequential client.
Run: .venv/bin/python benchmarks/key_release.py [--n 50] [--concurrency 64] 2>/dev/null
(the simulated provider warns on stderr at every collection, by design).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtee.attestation import collect_evidence  # noqa: E402
from medtee.broker.client import HttpBroker  # noqa: E402
from medtee.broker.protocol import obtain_data_key  # noqa: E402
from medtee.broker.server import BrokerServer  # noqa: E402
from medtee.broker.service import EmbeddedBroker  # noqa: E402
from medtee.sealing.seal import seal_records  # noqa: E402

RECIPE = "00" * 32


def _evidence(nonce: bytes, eph: bytes):
    return collect_evidence("simulated", None, nonce=nonce, ephemeral_public_key=eph, recipe_digest=RECIPE)


def _release(broker, manifest) -> bytes:
    return bytes(obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                                 recipe_digest=RECIPE, evidence_for=_evidence).data_key)


def _timed(label: str, n: int, fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        fn()
    per = (time.perf_counter() - start) / n
    print(f"{label:<34} {per * 1000:8.2f} ms/release  {1 / per:8.1f} releases/s")
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="sequential releases per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="parallel clients for the throughput run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(Path(tmp) / "broker")
        records = [{"id": "r0", "messages": [{"role": "user", "content": "benchmark"}]}]
        manifest = seal_records(records, Path(tmp) / "ds", broker=broker, policy="simulated", dataset_id="bench")
        _timed("embedded round trip", args.n, lambda: _release(broker, manifest))
        with BrokerServer(broker, "127.0.0.1", 0, quiet=True) as server:
            client = HttpBroker(server.url, store_dir=Path(tmp) / "broker")
            sequential = _timed("HTTP round trip (loopback)", args.n, lambda: _release(client, manifest))
            total = max(args.n, args.concurrency) * 2
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                start = time.perf_counter()
                keys = list(pool.map(lambda _: _release(client, manifest), range(total)))
                elapsed = time.perf_counter() - start
            assert len(set(keys)) == 1
            rate = total / elapsed
            print(f"{'HTTP, ' + str(args.concurrency) + ' concurrent clients':<34} {elapsed / total * 1000:8.2f} "
                  f"ms/release  {rate:8.1f} releases/s")
            print(f"ratio concurrent/sequential throughput: {rate * sequential:.2f}")


if __name__ == "__main__":
    main()
