"""Append-only, hash-chained audit log of key-broker decisions (JSON Lines).

Each entry carries `seq`, `prev` (the previous entry's hash; 64 zeros for the first) and `hash` = SHA-256 of the
entry's canonical JSON without `hash`. Editing, deleting, inserting or reordering entries breaks the chain.
Cutting entries off the end cannot be seen from the file alone. Beside it, `audit.log.mark` (the high-water mark)
names the last entry appended, and the broker records nothing while the log no longer holds that entry (restored
from an older copy, cut short, removed): its releases and their privacy budget would be forgotten. Restoring the
whole store rolls the mark back too, so anchor the head printed by `medtee broker audit verify` somewhere else (a
ticket, a transparency log) to detect that as well. Entries hold ids and digests, never data.

An entry counts once its line, newline included, is written and fsynced; only then is the decision it records
returned. A last line without its newline is an append that did not finish (a full disk, a crash): nothing was
returned for it, so the next append drops it (logged) instead of writing after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from medtee.files import NotRegularFile, read_regular, write_atomic

GENESIS = "0" * 64
MAX_MARK_BYTES = 1024
_log = logging.getLogger(__name__)


class AuditLogDamaged(Exception):
    """A complete line of the audit log is not an entry, or the log no longer holds the entry its high-water mark
    names: the broker appends nothing more until it is restored."""


def mark_path(path: Path) -> Path:
    """The high-water mark of the log at `path`: `{"seq", "hash", "end"}` of the last entry appended (`end`: the
    byte offset just after its line)."""
    return path.with_name(path.name + ".mark")


def _read_mark(path: Path) -> dict | None:
    """The mark of the log at `path`, None when there is none (a log from before marks, or a loss accepted)."""
    where = mark_path(path)
    try:
        mark = json.loads(read_regular(where, MAX_MARK_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, NotRegularFile, ValueError, RecursionError):
        mark = None
    if (isinstance(mark, dict) and isinstance(mark.get("seq"), int) and isinstance(mark.get("hash"), str)
            and isinstance(mark.get("end"), int) and mark["end"] > 0):
        return mark
    raise AuditLogDamaged(f"{where} is not an audit high-water mark; restore it from a backup, or, if {path.name} is "
                          f"its newest copy, remove it (the broker then marks the log's last entry at its next append)")


def _behind_mark(f, path: Path) -> str:
    """Why the log open in `f` no longer holds the entry its mark names ('' when it does, or has no mark)."""
    mark = _read_mark(path)
    if mark is None:
        return ""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size >= mark["end"] and _hash_of_line(f, mark["end"]) == mark["hash"]:
        return ""
    f.seek(max(0, size - 1))
    complete = size if f.read(1) == b"\n" else size - len(_tail(f, size))  # without an unfinished last line
    last = _last_line(f, path, complete) if complete else None
    if last is not None and last["seq"] >= mark["seq"]:
        return (f"{path} was altered before entry {mark['seq']}, which its high-water mark {mark_path(path).name} "
                f"names (it no longer ends at byte {mark['end']}); run `medtee broker audit verify` to find the "
                f"line, and restore the log from a copy before the broker records more")
    return (f"{path} no longer holds entry {mark['seq']} (hash {mark['hash'][:16]}...), which its high-water mark "
            f"{mark_path(path).name} names as the last one appended: it was restored from an older copy, cut short "
            f"or removed, which would forget the releases after that point and refund their privacy budget. Restore "
            f"the newest copy of {path.name}; only if no copy holds that entry, remove {mark_path(path).name} to "
            f"accept the loss")


def _write_mark(path: Path, entry: dict, end: int) -> None:
    """Record `entry`, whose line ends at byte `end`, as the log's high-water mark (a failure is logged: the entry
    stands, and the mark stays at an earlier entry)."""
    try:
        write_atomic(mark_path(path), json.dumps({"seq": entry["seq"], "hash": entry["hash"], "end": end}).encode())
    except OSError as e:
        _log.warning("%s: could not update the high-water mark (%s)", path, e.strerror or type(e).__name__)


def _entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entries(f, path: Path) -> Iterator[dict]:
    """The log's entries from the start of `f`, oldest first; AuditLogDamaged naming the first bad line."""
    f.seek(0)
    for lineno, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a line nested beyond the parser
                raise AuditLogDamaged(f"{path}:{lineno} is not an audit entry; run `medtee broker audit verify` and "
                                      f"restore the log from a copy before the broker records more") from None


def _drop_unfinished(f, path: Path) -> None:
    """Cut a last line that lacks its newline (an append that did not finish) off the end of `f`."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    keep = end - len(_tail(f, end))
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    _log.warning("%s: dropped an unfinished last entry (%d bytes, an append that did not complete)", path, end - keep)


def _tail(f, end: int) -> bytes:
    """The bytes after the last newline before `end`."""
    size = 4096
    while True:
        start = max(0, end - size)
        f.seek(start)
        chunk = f.read(end - start)
        if b"\n" in chunk or start == 0:
            return chunk.rsplit(b"\n", 1)[-1]
        size *= 2


def _last_line(f, path: Path, end: int | None = None) -> dict | None:
    """The last entry of `f` whose bytes up to `end` (default: all) end with a newline; None for an empty log."""
    if end is None:
        f.seek(0, os.SEEK_END)
        end = f.tell()
    if end == 0:
        return None
    try:
        entry = json.loads(_tail(f, end - 1))
        if isinstance(entry, dict) and isinstance(entry.get("seq"), int) and isinstance(entry.get("hash"), str):
            return entry
    except (ValueError, RecursionError):
        pass
    raise AuditLogDamaged(f"{path}: its last line is not an audit entry; run `medtee broker audit verify` and "
                              f"restore the log from a copy before the broker records more") from None


class AuditIndex(Protocol):
    """What decisions look up in the log, kept by an AuditLog from its entries."""

    def add(self, entry: dict) -> None:
        """Take the next entry of the log (each once, oldest first)."""

    def reset(self) -> None:
        """Forget every entry: the log will be read again from its start."""


class AuditLog:
    """Appends chained entries; safe across threads and processes (an exclusive file lock per append).

    With an `index`, every decision first feeds it the entries appended since the last one (by any process), so a
    decision costs the new entries, not the whole log; a log that is shorter than what was read, or whose entry at
    that point is another, is read again from its start (a log restored from a copy). An entry is read once: one
    edited in place later is not read again (`audit verify` finds the edit)."""

    def __init__(self, path: Path | str, index: AuditIndex | None = None) -> None:
        self.path = Path(path)
        self.index = index
        self._lock = threading.Lock()
        self._read = (0, None)  # bytes of the log `index` holds, and the hash of the last entry among them

    def entries(self) -> list[dict]:
        """The log's complete entries, oldest first (none for no log); AuditLogDamaged naming a bad line."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            lines = [line for line in f if line.endswith(b"\n")]
        with io.BytesIO(b"".join(lines)) as complete:
            return list(_entries(complete, self.path))

    def check_mark(self) -> None:
        """AuditLogDamaged when the log no longer holds the entry its high-water mark names (the next append would
        be refused), so that a command can refuse before it does any work; writes nothing."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            f = io.BytesIO()
        with f:
            if behind := _behind_mark(f, self.path):
                raise AuditLogDamaged(behind)

    def append(self, event: str, **fields: object) -> dict:
        """Append one entry (`event` plus JSON-ready `fields`) and return it."""
        return self.append_decided(lambda: (event, fields))

    def append_decided(self, decide: Callable[[], tuple[str, dict] | dict]) -> dict:
        """Under the same locks as `append`, with `index` up to date, `decide()` returns either `(event, fields)` to
        append or an existing entry to append nothing; an exception from it appends nothing. Returns the appended
        entry or that existing one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                _drop_unfinished(f, self.path)
                self._catch_up(f)  # first: it names a damaged line
                if behind := _behind_mark(f, self.path):
                    raise AuditLogDamaged(behind)
                decision = decide()
                if isinstance(decision, dict):
                    return decision
                event, fields = decision
                prev = _last_line(f, self.path)
                entry = {
                    "seq": prev["seq"] + 1 if prev else 0,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "event": event,
                    **fields,
                    "prev": prev["hash"] if prev else GENESIS,
                }
                entry["hash"] = _entry_hash(entry)
                f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
                _write_mark(self.path, entry, f.tell())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return entry

    def _catch_up(self, f) -> None:
        """Feed `index` the entries of `f` (every line complete) it has not seen, from the start if the log changed
        under what it holds."""
        if self.index is None:
            return
        offset, last = self._read
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if offset and (end < offset or _hash_of_line(f, offset) != last):
            self.index.reset()
            offset, last = self._read = 0, None
        f.seek(offset)
        for line in f:
            if line.strip():
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):
                    entry = None
                if not isinstance(entry, dict):
                    raise AuditLogDamaged(f"{self.path}: the line at byte {offset} is not an audit entry; run `medtee "
                                          f"broker audit verify` and restore the log from a copy before the broker "
                                          f"records more")
                self.index.add(entry)
                last = entry.get("hash")
            offset += len(line)
            self._read = (offset, last)


def _hash_of_line(f, end: int) -> object:
    """The `hash` of the entry whose line ends (newline included) at byte `end` of `f`, or None."""
    try:
        entry = json.loads(_tail(f, end - 1))
    except (ValueError, RecursionError):
        return None
    return entry.get("hash") if isinstance(entry, dict) else None


@dataclass(frozen=True)
class AuditReport:
    """Outcome of :func:`verify`: `ok`, number of entries, head hash, the first problem found, and the size in bytes
    of an unfinished last line (an append that did not complete; the broker drops it at its next append)."""

    ok: bool
    entries: int
    head: str
    problem: str = ""
    unfinished: int = 0


def verify(path: Path | str) -> AuditReport:
    """Check the whole chain of the log at `path`."""
    path = Path(path)
    if not path.exists():
        if mark_path(path).exists():
            return AuditReport(False, 0, GENESIS, f"{path} does not exist, but its high-water mark "
                               f"{mark_path(path).name} says entries were appended to it; restore the newest copy")
        return AuditReport(False, 0, GENESIS, f"{path} does not exist (removed, or this store has recorded no "
                           f"event yet); check the --broker-dir you passed")
    prev, n, unfinished = GENESIS, 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # only the last line can lack it
                unfinished = len(line)
                break
            try:
                entry = json.loads(line)
                ok_shape = isinstance(entry, dict) and {"seq", "prev", "hash"} <= entry.keys()
            except (ValueError, RecursionError):
                ok_shape = False
            if not ok_shape:
                return AuditReport(False, n, prev, f"{path}:{lineno}: not an audit entry (damaged or inserted line)")
            if entry["seq"] != n:
                return AuditReport(False, n, prev, f"{path}:{lineno}: seq {entry['seq']}, expected {n} (entry removed or reordered)")
            if entry["prev"] != prev:
                return AuditReport(False, n, prev, f"{path}:{lineno}: chain broken (previous entry altered or removed)")
            if _entry_hash(entry) != entry["hash"]:
                return AuditReport(False, n, prev, f"{path}:{lineno}: entry altered after it was written")
            prev, n = entry["hash"], n + 1
        try:
            behind = _behind_mark(f, path)
        except AuditLogDamaged as e:
            behind = str(e)
    if behind:
        return AuditReport(False, n, prev, behind, unfinished)
    return AuditReport(True, n, prev, unfinished=unfinished)
