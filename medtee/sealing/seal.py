"""The data owner's side: read chat records (JSONL, CSV transcripts, Parquet) and seal them into encrypted shards.

Output directory: `manifest.json` (signed) plus `part-NNNNN.parquet` shards encrypted with Parquet Modular
Encryption (AES_GCM_V1, encrypted footer), and with canaries (`medtee.audit.canaries`) the encrypted canary file.
Written under a temporary sibling directory and renamed into place; on any error that directory and the parent
directories made for it are removed.
Error messages name the file, line (or row) and field, never a record's id or content.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medtee.audit.canaries import CANARY_FILE, CanaryPlan, encrypt_canaries
from medtee.crypto import hpke
from medtee.data import DataError
from medtee.data.chat import message_text
from medtee.sealing.pme_keys import DATA_KEY_BYTES, encryption_properties
from medtee.sealing.manifest import (
    CIPHER,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CanaryInfo,
    Manifest,
    ShardInfo,
    check_dataset_id,
    data_key_info,
    key_check,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.broker.protocol import KeyBroker

FORMATS = ("jsonl", "csv", "parquet")
DEFAULT_ROWS_PER_SHARD = 20_000
DEFAULT_ROW_GROUP_ROWS = 1024
# The most one JSONL line or CSV row may hold (a transcript of several hundred hours); checked while reading, so a
# line of several GB is refused after 16 MiB instead of being read whole. Plain Parquet is read a batch at a time.
MAX_RECORD_BYTES = 16 << 20
_CSV_TURN = re.compile(r"^\s*(doctor|patient|system)\s*:\s?(.*)$", re.IGNORECASE)
_CSV_ROLE = {"doctor": "assistant", "patient": "user", "system": "system"}
_CSV_TEXT_COLUMNS = ("transcript", "dialogue", "conversation", "text")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: a "\ud800" escape, or a non-UTF-8 byte (see _Lines)
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

# A record and where it is: "file:line" (JSONL, CSV: the row's first line), "file: row N (counting from 0)"
# (Parquet) or "record N (counting from 0)" (records given in memory).
Located = tuple[str, dict]


class InputError(ValueError):
    """An input record is malformed. The message names file, line and field, never content."""


class OutputError(ValueError):
    """The sealed dataset cannot be written to `--out`. The message names `--out` and the fix."""


def _check_text(value: str, where: str, field: str) -> str:
    if not value.isascii() and _SURROGATE.search(value):
        raise InputError(f"{where}: {field} is not valid UTF-8 text (bytes that are not UTF-8, or a lone surrogate "
                         f"escape such as \\ud800); save the file as UTF-8 and fix the escapes")
    return value


def validate_record(obj: object, where: str) -> dict:
    """The record reduced to the chat schema `{"id", "messages": [{"role", "content"}]}`; InputError if malformed.

    `content` is a string or a list of `{"type": "text", "text": ...}` parts, stored flattened by
    `medtee.data.chat.content_text` (the training text is unchanged); other part types are refused.
    """
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a record must be a JSON object with 'id' and 'messages'")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise InputError(f"{where}: field 'id' must be a non-empty string")
    _check_text(rid, where, "field 'id'")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, m in enumerate(messages):
        try:
            role, text = message_text(m, i)  # the loader's own check of a message
        except DataError as e:  # names the message by index and a known part type only
            raise InputError(f"{where}: {e}") from None
        content = m["content"] if isinstance(m["content"], str) else text  # parts are stored flattened
        clean.append({"role": role, "content": _check_text(content, where, f"message {i}'s content")})
    return {"id": rid, "messages": clean}


class _Lines:
    """The lines of a text file, numbered from 1, decoded as UTF-8 with a leading BOM dropped; a byte that is not
    UTF-8 becomes a lone surrogate, refused by field in `validate_record`. Refuses a record (the lines read since
    `mark()`) over MAX_RECORD_BYTES before reading more of it."""

    def __init__(self, path: Path):
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise InputError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
        self._path, self.number, self._left = path, 0, MAX_RECORD_BYTES

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def mark(self) -> None:
        """A new record starts with the next line."""
        self._left = MAX_RECORD_BYTES

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            raw = self._file.readline(self._left + 1)
        except OSError as e:
            raise InputError(f"{self._path}:{self.number + 1}: cannot be read ({e.strerror})") from None
        if not raw:
            raise StopIteration
        self.number += 1
        if len(raw) > self._left:
            raise InputError(f"{self._path}:{self.number}: the record is over {MAX_RECORD_BYTES >> 20} MiB, the most "
                             f"one JSONL line or CSV row may hold; split the dialogue, or check the file's format "
                             f"(--format) and its line ends")
        self._left -= len(raw)
        if self.number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        return raw.decode("utf-8", "surrogateescape")


class _DuplicateKey(ValueError):
    """A JSON object with a key twice (json.loads would keep the last silently); args[0]: the key when it is a field
    of the chat schema, else None (another key could be data)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key if key in ("id", "messages", "role", "content", "type", "text") else None)
        obj[key] = value
    return obj


def read_jsonl(path: Path | str) -> Iterator[Located]:
    """Records of a chat JSONL file (blank lines skipped; extra fields dropped), each with its `file:line`."""
    path = Path(path)
    with _Lines(path) as lines:
        for line in lines:
            lines.mark()
            if not line.strip():
                continue
            where = f"{path}:{lines.number}"
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                field = f"field '{e.args[0]}'" if e.args[0] else "a key"
                raise InputError(f"{where}: a JSON object holds {field} twice, so which value is meant is ambiguous; "
                                 f"keep one") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply (a chat record needs 4 levels); one chat record "
                                 f"per line") from None
            except ValueError:  # Python's bound on integer digits
                raise InputError(f"{where}: a JSON number has over {sys.get_int_max_str_digits()} digits; no chat "
                                 f"record field is a number that long") from None
            yield where, validate_record(obj, where)


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


def read_csv(path: Path | str) -> Iterator[Located]:
    """Records of a CSV with columns `id` and a transcript column whose text has `Doctor:` / `Patient:` turn lines,
    each with the `file:line` its row starts on.

    The transcript column is the first of: transcript, dialogue, conversation, text. Doctor -> assistant,
    Patient -> user, System -> system; unprefixed lines continue the previous turn. A UTF-8 BOM is allowed.
    """
    path = Path(path)
    if csv.field_size_limit() < MAX_RECORD_BYTES:  # process-wide; raised (never lowered) to the row bound
        csv.field_size_limit(MAX_RECORD_BYTES)
    with _Lines(path) as lines:
        reader = csv.reader(lines)
        try:
            header = [h.strip().lower() for h in next(reader, [])]
            text_col = next((c for c in _CSV_TEXT_COLUMNS if c in header), None)
            if "id" not in header or text_col is None:
                raise InputError(f"{path}:{lines.number}: CSV header must have an 'id' column and one of "
                                 f"{', '.join(_CSV_TEXT_COLUMNS)}")
            id_at, text_at = header.index("id"), header.index(text_col)
            end = lines.number
            for row in reader:
                lines.mark()
                where, end = f"{path}:{end + 1}", lines.number
                if not row:
                    continue
                row += [""] * (max(id_at, text_at) + 1 - len(row))
                rec = {"id": row[id_at].strip(), "messages": _parse_transcript(row[text_at], where)}
                yield where, validate_record(rec, where)
        except csv.Error as e:  # the csv module's messages describe the syntax, not the data
            raise InputError(f"{path}:{lines.number}: not valid CSV ({e})") from None


def read_parquet(path: Path | str, batch_rows: int = 4096) -> Iterator[Located]:
    """Records of a plain (unencrypted) Parquet file with columns `id` and `messages` (list<struct<role, content>>),
    each with its row; page checksums, where the writer stored them, are verified."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}); use --format to pick the reader") from None
    missing = {"id", "messages"} - set(pf.schema_arrow.names)
    if missing:
        raise InputError(f"{path}: Parquet file lacks column(s) {', '.join(sorted(missing))} (need id, messages)")
    batches = pf.iter_batches(batch_size=batch_rows, columns=["id", "messages"])
    row = 0
    while True:
        try:
            batch = next(batches, None)
            records = [] if batch is None else batch.to_pylist()
        except Exception as e:  # a corrupt page: OSError, ArrowException or UnicodeDecodeError; none quotes data
            raise InputError(f"{path}: the rows from row {row} (counting from 0) on cannot be read "
                             f"({type(e).__name__}): the file is corrupt (a damaged page) or truncated; export it "
                             f"again") from None
        if batch is None:
            return
        for rec in records:
            where = f"{path}: row {row} (counting from 0)"
            yield where, validate_record(rec, where)
            row += 1


_READERS = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}


def read_input(path: Path | str, fmt: str | None = None) -> Iterator[Located]:
    """Records from `path` in `fmt` (jsonl, csv, parquet; default from the file suffix), each with where it is.

    The file is opened and its header and first record checked now, so that these errors come before any output.
    """
    path = Path(path)
    fmt = fmt or _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the suffix; pass --format jsonl|csv|parquet")
    if fmt not in _READERS:
        raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: input file does not exist") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a directory, FIFO or device); pass the file to seal")
    records = _READERS[fmt](path)
    first = next(records, None)
    if first is None:
        raise InputError(f"{path}: no records to seal: the file is empty")
    return itertools.chain([first], records)


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


def check_out_dir(out_dir: Path | str) -> Path:
    """`out_dir` as a Path if a sealed dataset can be put there (new, or an empty directory, with no file in the way
    among its parents); OutputError otherwise. Creates nothing."""
    out_dir = Path(out_dir)
    try:
        if out_dir.exists():
            if not out_dir.is_dir():
                raise OutputError(f"--out {out_dir} exists and is not a directory; choose another --out")
            if any(out_dir.iterdir()):
                raise OutputError(f"--out {out_dir} is not empty; choose a new --out directory (sealed data is never "
                                  f"overwritten)")
            return out_dir
        parent = next((p for p in out_dir.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputError(f"--out {out_dir}: {parent} is a file, not a directory; choose an --out below a directory")
    except OSError as e:
        raise OutputError(f"--out {out_dir} cannot be checked ({e.strerror}); choose another --out") from None
    return out_dir


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first; stops at the first that is not empty
        try:
            d.rmdir()
        except OSError:
            return


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A new temporary sibling of `out_dir` (with the parent directories it needs) to write the dataset in; on an
    error it is removed, and so are the parents made for it."""
    made = [p for p in out_dir.parents if not p.exists()]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.sealing-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise OutputError(f"--out {out_dir} cannot be created ({e.strerror}); choose an --out in a directory you can "
                          f"write") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


@contextmanager
def _writing(out_dir: Path) -> Iterator[None]:
    """An OSError while writing the dataset (a full disk, a quota, an I/O error) as an OutputError naming `--out`."""
    try:
        yield
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else type(e).__name__
        raise OutputError(f"--out {out_dir}: writing the sealed dataset failed ({reason}); nothing was kept: free "
                          f"space there (or choose an --out on another disk) and seal again") from None


def _with_canaries(records: Iterable[Located], plan: CanaryPlan) -> Iterator[Located]:
    """The real records with the plan's canary records among them, each after as many real records as the plan says;
    InputError if the input does not hold the number of records the plan was made for."""
    insertions, at, real = plan.insertions, 0, 0
    for located in records:
        while at < len(insertions) and insertions[at][0] <= real:
            yield f"canary record {at} (counting from 0)", insertions[at][1]
            at += 1
        yield located
        real += 1
    if real != plan.real_records:
        raise InputError(f"the input holds {real} records, the canaries were placed among {plan.real_records}: the "
                         f"input changed while sealing; seal again")
    for n, (_, rec) in enumerate(insertions[at:], at):
        yield f"canary record {n} (counting from 0)", rec


def _write_canaries(tmp: Path, plan: CanaryPlan, data_key: bytes, dataset_id: str) -> CanaryInfo:
    blob = encrypt_canaries(plan.canaries, data_key, dataset_id)
    (tmp / CANARY_FILE).write_bytes(blob)
    return CanaryInfo(name=CANARY_FILE, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob),
                      inserted=plan.inserted, controls=plan.controls, records=len(plan.insertions))


def seal_located(
    records: Iterable[Located],
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
    canaries: CanaryPlan | None = None,
    policy_sha256: str | None = None,
) -> Manifest:
    """Seal validated `records` (`(where, record)` pairs, as `read_input` yields them) into `out_dir` under a fresh
    data key wrapped to `broker`'s key; register it with the broker (an embedded one given `policy_sha256`, the
    digest of the policy file the sealer checked, refuses unless it still holds exactly that).

    `policy` names the attestation policy the broker must apply before releasing the key. The manifest is signed
    with `signing_key` (default: the data owner's key the broker object keeps, `broker.owner_signing_key()`).
    `tokenizer` (`demo` or a local Hugging Face tokenizer; see `medtee.sealing.tokens`) records the token count of
    the chat-formatted text and the tokenizer's fingerprint; without it both manifest fields are None.
    `canaries` (`medtee.audit.canaries.plan_canaries`, made for the number of records in `records`) adds the canary
    records where the plan puts them and writes the canaries, encrypted under the data key, to the canary file the
    manifest lists; the counts in the manifest include the canary records.
    Refuses a non-empty existing `out_dir`; on any error nothing is left behind. Errors name records by `where`.
    """
    out_dir = check_out_dir(out_dir)
    dataset_id = check_dataset_id(dataset_id or f"ds-{uuid.uuid4().hex[:12]}")
    if not isinstance(policy, str) or not policy:
        raise ValueError("policy must name an attestation policy (e.g. 'simulated' for development)")
    if rows_per_shard < 1 or row_group_rows < 1:
        raise ValueError("rows_per_shard and row_group_rows must be positive")
    if signing_key is None:
        signing_key = broker.owner_signing_key()
    counter = described = None
    if tokenizer is not None:
        from medtee.sealing import tokens

        loaded = tokens.load_tokenizer(tokenizer)
        counter, described = tokens.TokenCounter(loaded), tokens.describe(tokenizer, loaded)
    scheme, broker_public = broker.public_key()
    data_key = os.urandom(DATA_KEY_BYTES)
    if canaries is not None:
        records = _with_canaries(records, canaries)
    with _staging(out_dir) as tmp:
        shards: list[ShardInfo] = []
        counts = {"records": 0, "messages": 0, "chars": 0}
        first_seen: dict[str, str] = {}  # id -> where it first occurs
        buf: list[dict] = []

        def flush() -> None:
            with _writing(out_dir):
                shards.append(_write_shard(tmp / f"part-{len(shards):05d}.parquet", buf, data_key, row_group_rows))
            buf.clear()

        for where, rec in records:
            if rec["id"] in first_seen:
                raise InputError(f"{where}: duplicate id: {first_seen[rec['id']]} has the same id (ids must be unique "
                                 f"within a dataset)")
            first_seen[rec["id"]] = where
            counts["records"] += 1
            counts["messages"] += len(rec["messages"])
            counts["chars"] += sum(len(m["content"]) for m in rec["messages"])
            buf.append(rec)
            if counter is not None:
                counter.add(rec, where)
            if len(buf) >= rows_per_shard:
                flush()
        if buf:
            flush()
        if not shards:
            raise InputError("no records to seal: the input is empty")
        canary_info = None
        if canaries is not None:
            with _writing(out_dir):
                canary_info = _write_canaries(tmp, canaries, data_key, dataset_id)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            dataset_id=dataset_id,
            record_count=counts["records"],
            message_count=counts["messages"],
            char_count=counts["chars"],
            token_count=counter.total() if counter is not None else None,
            tokenizer=described,
            shards=tuple(shards),
            key_id=hpke.key_id(scheme, broker_public),
            scheme=scheme.value,
            wrapped_data_key=hpke.wrap(data_key, broker_public, scheme=scheme, info=data_key_info(dataset_id)),
            key_check=key_check(data_key, dataset_id),
            release_policy=policy,
            classification=classification,
            dua_id=dua_id,
            created=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            cipher=CIPHER,
            owner_public_key=b"",
            canaries=canary_info,
        ).signed(signing_key)
        with _writing(out_dir):
            (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above); rename needs it gone
            os.rename(tmp, out_dir)
        try:  # registered only once the dataset is in place: a seal refused on the way registers nothing
            broker.register(manifest, **({"policy_sha256": policy_sha256} if policy_sha256 else {}))
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return manifest


def seal_records(records: Iterable[dict], out_dir: Path | str, **kwargs) -> Manifest:
    """:func:`seal_located` of records given in memory, each validated and named by its position."""
    located = ((f"record {n} (counting from 0)", rec) for n, rec in enumerate(records))
    return seal_located(((where, validate_record(rec, where)) for where, rec in located), out_dir, **kwargs)
