"""Loader throughput: tokens/s from a sealed dataset against the same data as plaintext Parquet, same process.

Both paths stream record batches (`iter_batches`) and tokenize them the same way (`tokenize_records`: one
fast-tokenizer batch call per 512 records, loss masks in numpy; demo tokenizer). The sealed path also checks the
manifest and every shard's digest (`open_dataset`) and decrypts (AES_GCM_V1). The plaintext copy has the same
shards, row groups and compression, so the ratio isolates what sealing costs the loader.

    python benchmarks/loader.py            # ../shared/data/dev.jsonl replicated to >= 200 MB of text
    python benchmarks/loader.py --mb 5     # smoke run

The last line is `ratio sealed/plain: X` (tokens/s sealed over tokens/s plain; 1.0 means sealing costs nothing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load_replicated(source: Path, megabytes: float) -> tuple[list[dict], int]:
    """The source dialogues (id and messages only), repeated under fresh ids until their text reaches `megabytes`."""
    with open(source, encoding="utf-8") as f:
        base = [{"id": r["id"], "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                for r in map(json.loads, f)]
    base_chars = sum(len(m["content"]) for r in base for m in r["messages"])
    copies = max(1, -(-int(megabytes * 1e6) // base_chars))
    records = [{"id": f"copy{k}/{r['id']}", "messages": r["messages"]} for k in range(copies) for r in base]
    return records, copies * base_chars


def write_plain(records: list[dict], out_dir: Path, rows_per_shard: int, row_group_rows: int) -> list[Path]:
    """Plaintext Parquet shards laid out like the sealed ones (same schema, rows per shard, row groups, zstd)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("messages", pa.list_(message))])
    out_dir.mkdir()
    paths = []
    for start in range(0, len(records), rows_per_shard):
        path = out_dir / f"part-{len(paths):05d}.parquet"
        table = pa.Table.from_pylist(records[start:start + rows_per_shard], schema=schema)
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows)
        paths.append(path)
    return paths


def run(batches, tokenizer, max_length: int, tokenize: bool) -> tuple[int, int]:
    """(rows, tokens) read from `batches`; tokens are counted only when tokenizing."""
    from medtee.data.module import tokenize_records

    rows = tokens = 0
    for batch in batches:
        rows += batch.num_rows
        if tokenize:
            tokens += len(tokenize_records(batch.to_pylist(), tokenizer, max_length=max_length).input_ids)
    return rows, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="megabytes of dialogue text (default 200)")
    parser.add_argument("--source", type=Path, default=SHARED / "data" / "dev.jsonl", help="chat JSONL to replicate")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per dialogue (cut beyond)")
    parser.add_argument("--batch-rows", type=int, default=1024, help="rows per record batch")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds, alternating which path goes first; the best time of each is kept")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"{args.source} is missing: this benchmark reads the public dialogues in ../shared/data")

    from medtee.data.tokenizer import build_demo_tokenizer
    from medtee.broker.service import EmbeddedBroker
    from medtee.sealing.reader import open_dataset
    from medtee.sealing.seal import DEFAULT_ROW_GROUP_ROWS, DEFAULT_ROWS_PER_SHARD, seal_records

    tokenizer = build_demo_tokenizer()
    with tempfile.TemporaryDirectory(prefix="medtee-loader-bench-") as tmp:
        tmp = Path(tmp)
        records, chars = load_replicated(args.source, args.mb)
        started = time.perf_counter()
        broker = EmbeddedBroker(tmp / "broker")
        seal_records(records, tmp / "sealed", broker=broker, policy="simulated", dataset_id="loader-bench")
        sealed_s = time.perf_counter() - started
        plain_paths = write_plain(records, tmp / "plain", DEFAULT_ROWS_PER_SHARD, DEFAULT_ROW_GROUP_ROWS)
        n_records = len(records)
        del records
        sealed_bytes = sum(p.stat().st_size for p in (tmp / "sealed").iterdir())
        print(f"data: {n_records} dialogues, {chars / 1e6:.1f} MB of text; sealed in {sealed_s:.1f} s "
              f"({sealed_bytes / 1e6:.1f} MB on disk)")

        def plain(tokenize: bool) -> tuple[int, int]:
            import pyarrow.parquet as pq

            batches = (b for p in plain_paths for b in pq.ParquetFile(p).iter_batches(batch_size=args.batch_rows))
            return run(batches, tokenizer, args.max_length, tokenize)

        def sealed(tokenize: bool) -> tuple[int, int]:
            dataset = open_dataset(tmp / "sealed")  # manifest signature and every shard's digest, up front
            key = broker.unwrap_data_key(dataset.manifest)
            return run(dataset.iter_batches(key, batch_rows=args.batch_rows), tokenizer, args.max_length, tokenize)

        best: dict[tuple[str, bool], float] = {}
        tokens = {}
        for round_ in range(args.rounds):
            for tokenize in (False, True):
                paths = (("plain", plain), ("sealed", sealed))
                for name, fn in paths if round_ % 2 == 0 else paths[::-1]:  # alternate which goes first
                    started = time.perf_counter()
                    rows, count = fn(tokenize)
                    elapsed = time.perf_counter() - started
                    assert rows == n_records, f"{name}: read {rows} of {n_records} rows"
                    best[name, tokenize] = min(best.get((name, tokenize), float("inf")), elapsed)
                    if tokenize:
                        tokens.setdefault(name, count)
        assert tokens["plain"] == tokens["sealed"], "the sealed and plaintext copies tokenized differently"

    mb = chars / 1e6
    for name in ("plain", "sealed"):
        print(f"{name:>6}: read {mb / best[name, False]:8.1f} MB/s of text | read + tokenize "
              f"{tokens[name] / best[name, True]:12,.0f} tokens/s ({mb / best[name, True]:.2f} MB/s)")
    print(f"read only, ratio sealed/plain: {best['plain', False] / best['sealed', False]:.3f}")
    print(f"ratio sealed/plain: {best['plain', True] / best['sealed', True]:.3f}")


if __name__ == "__main__":
    main()
