"""The data owner's side: read chat records (JSONL, CSV transcripts, Parquet) and seal them into encrypted shards.

Output directory: `manifest.json` (signed) plus `part-NNNNN.parquet` shards encrypted with Parquet Modular
Encryption (AES_GCM_V1, encrypted footer). Written under a temporary sibling directory and renamed into place.
Error messages name the file, line/row and field, never the content.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medtee.sealing import keywrap
from medtee.sealing.kms import DATA_KEY_BYTES, encryption_properties
from medtee.sealing.manifest import (
    CIPHER,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    check_dataset_id,
    data_key_info,
    key_check,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.broker.protocol import KeyBroker

ROLES = ("user", "assistant", "system")
FORMATS = ("jsonl", "csv", "parquet")
DEFAULT_ROWS_PER_SHARD = 20_000
DEFAULT_ROW_GROUP_ROWS = 1024
_CSV_TURN = re.compile(r"^\s*(doctor|patient|system)\s*:\s?(.*)$", re.IGNORECASE)
_CSV_ROLE = {"doctor": "assistant", "patient": "user", "system": "system"}
_CSV_TEXT_COLUMNS = ("transcript", "dialogue", "conversation", "text")


class InputError(ValueError):
    """An input record is malformed. The message names file, line and field, never content."""


def validate_record(obj: object, where: str) -> dict:
    """The record reduced to the chat schema `{"id", "messages": [{"role", "content"}]}`; InputError if malformed."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a record must be a JSON object with 'id' and 'messages'")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise InputError(f"{where}: field 'id' must be a non-empty string")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    return {"id": rid, "messages": clean}


def read_jsonl(path: Path | str) -> Iterator[dict]:
    """Records of a chat JSONL file (blank lines skipped; extra fields dropped); errors name `file:line` and field."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
            yield validate_record(obj, f"{path}:{n}")


def _parse_transcript(text: str, where: str) -> list[dict]:
    messages: list[dict] = []
    for k, line in enumerate(text.splitlines(), 1):
        m = _CSV_TURN.match(line)
        if m:
            messages.append({"role": _CSV_ROLE[m.group(1).lower()], "content": m.group(2).strip()})
        elif line.strip():
            if not messages:
                raise InputError(f"{where}: transcript line {k} comes before any 'Doctor:' or 'Patient:' turn")
            messages[-1]["content"] = (messages[-1]["content"] + "\n" + line.strip()).strip()
    if not messages:
        raise InputError(f"{where}: transcript has no 'Doctor:' or 'Patient:' turn lines")
    return messages


def read_csv(path: Path | str) -> Iterator[dict]:
    """Records of a CSV with columns `id` and a transcript column whose text has `Doctor:` / `Patient:` turn lines.

    The transcript column is the first of: transcript, dialogue, conversation, text. Doctor -> assistant,
    Patient -> user, System -> system; unprefixed lines continue the previous turn.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        text_col = next((c for c in _CSV_TEXT_COLUMNS if c in header), None)
        if "id" not in header or text_col is None:
            raise InputError(f"{path}: CSV header must have an 'id' column and one of {', '.join(_CSV_TEXT_COLUMNS)}")
        names = {h.strip().lower(): h for h in reader.fieldnames or []}
        for n, row in enumerate(reader, 1):
            where = f"{path}: row {n}"
            text = row.get(names[text_col]) or ""
            yield validate_record({"id": (row.get(names["id"]) or "").strip(), "messages": _parse_transcript(text, where)}, where)


def read_parquet(path: Path | str, batch_rows: int = 4096) -> Iterator[dict]:
    """Records of a plain (unencrypted) Parquet file with columns `id` and `messages` (list<struct<role, content>>)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}); use --format to pick the reader") from None
    missing = {"id", "messages"} - set(pf.schema_arrow.names)
    if missing:
        raise InputError(f"{path}: Parquet file lacks column(s) {', '.join(sorted(missing))} (need id, messages)")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "messages"]):
        for rec in batch.to_pylist():
            yield validate_record(rec, f"{path}: row {row}")
            row += 1


def read_input(path: Path | str, fmt: str | None = None) -> Iterator[dict]:
    """Records from `path` in `fmt` (jsonl, csv, parquet); the format defaults from the file suffix."""
    path = Path(path)
    if fmt is None:
        fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(
            path.suffix.lower()
        )
        if fmt is None:
            raise InputError(f"{path}: cannot tell the format from the suffix; pass --format jsonl|csv|parquet")
    if not path.is_file():
        raise InputError(f"{path}: input file does not exist")
    readers = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}
    if fmt not in readers:
        raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")
    return readers[fmt](path)


def _schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("id", pa.string()), ("messages", pa.list_(message))])


def _write_shard(path: Path, rows: list[dict], data_key: bytes, row_group_rows: int) -> ShardInfo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema())
    with pq.ParquetWriter(path, table.schema, encryption_properties=encryption_properties(data_key), compression="zstd") as w:
        w.write_table(table, row_group_size=row_group_rows)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return ShardInfo(name=path.name, sha256=digest.hexdigest(), rows=len(rows), bytes=path.stat().st_size)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another --out")
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} is not empty; choose a new --out directory (sealed data is never overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def seal_records(
    records: Iterable[dict],
    out_dir: Path | str,
    *,
    broker: KeyBroker,
    policy: str,
    dataset_id: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    signing_key: Ed25519PrivateKey | None = None,
    classification: str = "phi",
    dua_id: str = "",
    tokenizer: str | None = None,
) -> Manifest:
    """Seal `records` into `out_dir` under a fresh data key wrapped to `broker`'s key; register it with the broker.

    `policy` names the attestation policy the broker must apply before releasing the key. The manifest is signed
    with `signing_key` (default: the data owner's key the broker object keeps, `broker.owner_signing_key()`).
    `tokenizer` (`demo` or a local Hugging Face tokenizer; see `medtee.sealing.tokens`) records the token count of
    the chat-formatted text and the tokenizer's fingerprint; without it both manifest fields are None.
    Refuses a non-empty existing `out_dir`; on any error nothing is left behind.
    """
    out_dir = Path(out_dir)
    dataset_id = check_dataset_id(dataset_id or f"ds-{uuid.uuid4().hex[:12]}")
    if not isinstance(policy, str) or not policy:
        raise ValueError("policy must name an attestation policy (e.g. 'simulated' for development)")
    if rows_per_shard < 1 or row_group_rows < 1:
        raise ValueError("rows_per_shard and row_group_rows must be positive")
    if signing_key is None:
        signing_key = broker.owner_signing_key()
    _prepare_out_dir(out_dir)
    counter = described = None
    if tokenizer is not None:
        from medtee.sealing import tokens

        loaded = tokens.load_tokenizer(tokenizer)
        counter, described = tokens.TokenCounter(loaded), tokens.describe(tokenizer, loaded)
    scheme, broker_public = broker.public_key()
    data_key = os.urandom(DATA_KEY_BYTES)
    tmp = out_dir.parent / f".{out_dir.name}.sealing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards: list[ShardInfo] = []
        counts = {"records": 0, "messages": 0, "chars": 0}
        seen: set[str] = set()
        buf: list[dict] = []

        def flush() -> None:
            shards.append(_write_shard(tmp / f"part-{len(shards):05d}.parquet", buf, data_key, row_group_rows))
            buf.clear()

        for n, rec in enumerate(records):
            rec = validate_record(rec, f"record {n}")
            if rec["id"] in seen:
                raise InputError(f"record {n}: duplicate id (ids must be unique within a dataset)")
            seen.add(rec["id"])
            counts["records"] += 1
            counts["messages"] += len(rec["messages"])
            counts["chars"] += sum(len(m["content"]) for m in rec["messages"])
            buf.append(rec)
            if counter is not None:
                counter.add(rec)
            if len(buf) >= rows_per_shard:
                flush()
        if buf:
            flush()
        if not shards:
            raise InputError("no records to seal: the input is empty")
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            dataset_id=dataset_id,
            record_count=counts["records"],
            message_count=counts["messages"],
            char_count=counts["chars"],
            token_count=counter.total() if counter is not None else None,
            tokenizer=described,
            shards=tuple(shards),
            key_id=keywrap.key_id(scheme, broker_public),
            scheme=scheme.value,
            wrapped_data_key=keywrap.wrap(data_key, broker_public, scheme=scheme, info=data_key_info(dataset_id)),
            key_check=key_check(data_key, dataset_id),
            release_policy=policy,
            classification=classification,
            dua_id=dua_id,
            created=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            cipher=CIPHER,
            owner_public_key=b"",
        ).signed(signing_key)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        broker.register(manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs it gone
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def seal_file(input_path: Path | str, out_dir: Path | str, *, fmt: str | None = None, **kwargs) -> Manifest:
    """:func:`seal_records` over :func:`read_input` (the `medtee seal` command's core)."""
    return seal_records(read_input(input_path, fmt), out_dir, **kwargs)

