"""What the audit log's length costs a key release: one with a DP budget (`recipe.dp_budget`, which looks up the
dataset's earlier releases under the log's lock, as a release close does) and one without, on a log of N earlier
entries against the same release on a fresh log, in one process. A broker reads the whole log at its first decision
(printed apart: "first") and then only what was appended since. Last, what the high-water mark (`audit.log.mark`,
replaced atomically after every append) adds to an append: appends with it against appends without it.

Uses SIMULATED attestation evidence (the appraisal path is the real one). The earlier entries are written as the
broker writes them (chained, about 0.8 KiB each), half of them releases of other datasets.
Run: .venv/bin/python benchmarks/audit_log.py [--entries 10000 100000] [--n 20] 2>/dev/null
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from medtee.attestation import collect_evidence  # noqa: E402
from medtee.broker import audit  # noqa: E402
from medtee.broker.audit import _entry_hash  # noqa: E402
from medtee.broker.protocol import canonical_json, obtain_data_key  # noqa: E402
from medtee.broker.service import EmbeddedBroker  # noqa: E402
from medtee.paths import conf_dir  # noqa: E402
from medtee.sealing.seal import seal_records  # noqa: E402

RECIPE = {"mode": "train", "privacy": {"dp": {"enabled": True, "target_epsilon": 1e-9, "target_delta": 1e-12}},
          "tracking": {"min_aggregate": 20}}
DIGEST = hashlib.sha256(canonical_json(RECIPE)).hexdigest()


def _evidence(nonce: bytes, eph: bytes):
    return collect_evidence("simulated", None, nonce=nonce, ephemeral_public_key=eph, recipe_digest=DIGEST)


def _store(root: Path, budgeted: bool):
    broker = EmbeddedBroker(root / "broker")
    doc = yaml.safe_load((conf_dir() / "attestation" / "simulated.yaml").read_text())
    doc.update(name="bench")
    if budgeted:
        doc["recipe"] = {**doc["recipe"], "require_dp": True, "dp_budget": {"epsilon": 1e6}}
    (root / "bench.yaml").write_text(yaml.safe_dump(doc))
    broker.add_policy("bench", root / "bench.yaml")
    records = [{"id": "r0", "messages": [{"role": "user", "content": "benchmark"}]}]
    return broker, seal_records(records, root / "ds", broker=broker, policy="bench", dataset_id="bench")


def _prefill(log: Path, n: int) -> None:
    """Append `n` chained entries after the log's own (register, policy-add), as the broker writes them."""
    last = json.loads(log.read_text().splitlines()[-1])
    seq, prev = last["seq"], last["hash"]
    with open(log, "a") as f:
        for i in range(n):
            seq += 1
            entry = {"seq": seq, "time": "2026-12-02T00:00:00.000+00:00", "event": "release" if i % 2 else "deny",
                     "dataset_id": f"other-{i % 50}", "policy": "bench", "policy_sha256": "ab" * 32,
                     "client": "127.0.0.1", "recipe_digest": "cd" * 32, "manifest_digest": "ef" * 32,
                     "nonce": "0123456789abcdef", "evidence": "12" * 32, "simulated": True,
                     "ephemeral_key": "34" * 16, "dp_spend": {"epsilon": 1.0, "delta": 1e-5}, "prev": prev}
            entry["hash"] = prev = _entry_hash(entry)
            f.write(json.dumps(entry, sort_keys=True) + "\n")


def _per_release(entries: int, budgeted: bool, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        broker, manifest = _store(Path(tmp), budgeted)
        _prefill(broker.store_dir / "audit.log", entries)

        def release():
            obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                            recipe_digest=DIGEST, evidence_for=_evidence, recipe=RECIPE)

        start = time.perf_counter()
        release()  # the broker's first decision: it reads the log
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            release()
        return first, (time.perf_counter() - start) / n


def _per_append(n: int, marked: bool) -> float:
    """Seconds per `AuditLog.append` (an fsynced line), with the high-water mark read, checked and written at each,
    or (the baseline, as before marks) none of that."""
    saved = audit._read_mark, audit._behind_mark, audit._write_mark
    if not marked:
        audit._read_mark, audit._behind_mark, audit._write_mark = lambda path: {}, lambda *a: "", lambda *a: None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = audit.AuditLog(Path(tmp) / "audit.log")
            log.append("warm")
            start = time.perf_counter()
            for i in range(n):
                log.append("bench", i=i)
            return (time.perf_counter() - start) / n
    finally:
        audit._read_mark, audit._behind_mark, audit._write_mark = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000], help="earlier entries")
    parser.add_argument("--n", type=int, default=20, help="releases per measurement")
    args = parser.parse_args()
    for budgeted in (False, True):
        label = "with a DP budget" if budgeted else "without a budget"
        _, base = _per_release(0, budgeted, args.n)
        print(f"{label:<18} fresh log         {base * 1000:8.1f} ms/release")
        for n in args.entries:
            first, per = _per_release(n, budgeted, args.n)
            print(f"{label:<18} {n:>7} entries  {per * 1000:8.1f} ms/release  ratio to fresh log {per / base:5.2f}  "
                  f"(first {first * 1000:.0f} ms)")
    bare, marked = _per_append(args.n * 5, False), _per_append(args.n * 5, True)
    print(f"append without mark {bare * 1000:8.2f} ms   with mark {marked * 1000:8.2f} ms   ratio {marked / bare:5.2f}")


if __name__ == "__main__":
    main()
