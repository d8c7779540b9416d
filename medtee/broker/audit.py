"""Append-only, hash-chained audit log of key-broker decisions (JSON Lines).

Each entry carries `seq`, `prev` (the previous entry's hash; 64 zeros for the first) and `hash` = SHA-256 of the
entry's canonical JSON without `hash`. Editing, deleting, inserting or reordering entries breaks the chain.
Cutting entries off the end cannot be seen from the file alone. Beside it, `audit.log.mark` (the high-water mark)
names the last entry appended, and the broker records nothing while the log does not hold that entry (restored
from an older copy, cut short, removed): its releases and their privacy budget would be forgotten. Removing the mark
accepts the log as it is; the next decision records that (`mark-start`). Restoring the whole store rolls the mark
back too, so anchor the head printed by `medtee broker audit verify` somewhere else (a ticket, a transparency log)
to detect that as well. Entries hold ids and digests, never data.

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
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from medtee.files import NotRegularFile, open_regular, read_regular, write_atomic

GENESIS = "0" * 64
MAX_MARK_BYTES = 1024
_log = logging.getLogger(__name__)


class AuditLogDamaged(Exception):
    """A complete line of the audit log is not an entry or does not follow the one before it, the log does not hold
    the entry its high-water mark names, or the mark cannot be read or written: the broker records no decision until
    the owner restores it (the message names the fix)."""


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
        if not os.path.lexists(where):
            return None
        mark = None  # a link to nothing
    except NotRegularFile:
        mark = None
    except OSError as e:
        raise AuditLogDamaged(f"cannot read {where} ({e.strerror or type(e).__name__}); fix its permissions or the "
                              f"disk, then try again") from None
    except (ValueError, RecursionError):
        mark = None
    if (isinstance(mark, dict) and type(mark.get("seq")) is int and isinstance(mark.get("hash"), str)
            and type(mark.get("end")) is int and mark["end"] > 0):
        return mark
    raise AuditLogDamaged(f"{where} is not an audit high-water mark; restore it from a backup, or, if {path.name} is "
                          f"its newest copy, remove it (the broker then marks the log's last entry at its next append)")


def _line_entry(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _is_marked(entry: dict | None, mark: dict) -> bool:
    """Whether `entry` is the one `mark` names: its seq and hash, and a hash that is its own."""
    return (entry is not None and entry.get("seq") == mark["seq"] and entry.get("hash") == mark["hash"]
            and _entry_hash(entry) == mark["hash"])


def _complete_end(f) -> int:
    """The size of `f` without an unfinished last line (a whole entry that lost only its newline counts)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return 0
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return size
    keep = size - len(_tail(f, size))
    return size if _whole_tail(f, keep, size) else keep


def _whole_tail(f, keep: int, end: int) -> bool:
    """Whether the bytes of `f` from `keep` to `end` (after its last newline) are a whole entry that follows the line
    before them: one that lost only its newline (an editor, a copy), not a torn append (a strict prefix of an
    entry's JSON object is never a JSON object)."""
    f.seek(keep)
    entry = _line_entry(f.read(end - keep))
    if entry is None or _entry_hash(entry) != entry.get("hash"):
        return False
    if not keep:
        return entry.get("seq") == 0 and entry.get("prev") == GENESIS
    before = _line_entry(_tail(f, keep - 1))
    return (before is not None and type(before.get("seq")) is int and entry.get("seq") == before["seq"] + 1
            and entry.get("prev") == before.get("hash"))


def _holds(f, mark: dict, complete: int) -> bool:
    """Whether the first `complete` bytes of `f` hold the entry `mark` names: at its recorded offset, else anywhere
    (a log rewritten with other spacing)."""
    end = mark["end"]
    if end <= complete:
        f.seek(end - 1)
        if f.read(1) == b"\n" and _is_marked(_line_entry(_tail(f, end - 1)), mark):
            return True
    needle, seen = mark["hash"].encode(), 0
    f.seek(0)
    for line in f:
        seen += len(line)
        if seen > complete:
            break
        if needle in line and _is_marked(_line_entry(line), mark):
            return True
    return False


def _behind_mark(f, path: Path, mark: dict | None) -> str:
    """Why the log at `path`, open in `f`, does not hold the entry `mark` (its mark) names ('' when it does, or when
    it has no mark)."""
    if mark is None:
        return ""
    complete = _complete_end(f)
    if _holds(f, mark, complete):
        return ""
    last = _last_line(f, path, complete) if complete else None
    how = (f"though it has entries up to {last['seq']}: it was altered, or replaced by another log"
           if last is not None and last["seq"] >= mark["seq"] else
           "it was restored from an older copy, cut short or removed")
    return (f"{path} does not hold entry {mark['seq']} (hash {mark['hash'][:16]}...), which its high-water mark "
            f"{mark_path(path).name} names as the last one appended, {how}; that would forget the releases up to "
            f"there and refund their privacy budget. Restore the newest copy of {path.name}; only if no copy holds "
            f"that entry, remove {mark_path(path).name} to accept the loss")


def _write_mark(path: Path, entry: dict, end: int) -> None:
    """Record `entry`, whose line ends at byte `end`, as the log's high-water mark; AuditLogDamaged when that fails
    (the entry stays in the log, so what it records is counted, but the decision is not returned)."""
    try:
        write_atomic(mark_path(path), json.dumps({"seq": entry["seq"], "hash": entry["hash"], "end": end}).encode(),
                     sync_dir=True)
    except OSError as e:
        raise AuditLogDamaged(f"{path}: entry {entry['seq']} was recorded but the high-water mark could not be "
                              f"updated ({e.strerror or type(e).__name__}), so its decision is not returned; free "
                              f"disk space or fix the store's permissions, then try again") from None


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


def _drop_unfinished(f, path: Path) -> bool:
    """Cut a last line that lacks its newline (an append that did not finish) off the end of `f`; a whole entry that
    lost only its newline gets it back instead (True)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return False
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return False
    keep = end - len(_tail(f, end))
    restored = _whole_tail(f, keep, end)
    if restored:
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
    else:
        f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    if restored:
        _log.warning("%s: the last entry had lost its newline; it was put back", path)
    else:
        _log.warning("%s: dropped an unfinished last entry (%d bytes, an append that did not complete)", path,
                     end - keep)
    return restored


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
        self._read = (0, None, -1)  # bytes of the log `index` holds, and the hash and seq of the last entry in them
        self._unmarked = None  # (inode, size, last hash) of a log whose mark-start this AuditLog could not mark

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
            f = open_regular(self.path)[0]
        except FileNotFoundError:
            f = io.BytesIO()
        except (NotRegularFile, OSError) as e:
            raise AuditLogDamaged(_unreadable(self.path, e)) from None
        with f:
            if behind := _behind_mark(f, self.path, _read_mark(self.path)):
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
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise AuditLogDamaged(_unreadable(self.path, NotRegularFile("is not a regular file")))
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                mark = _read_mark(self.path)
                if behind := _behind_mark(f, self.path, mark):  # before an unfinished line is cut: not the marked one
                    raise AuditLogDamaged(behind)
                self._catch_up(f)  # the complete lines first: a log refused for them is left as it is
                if _drop_unfinished(f, self.path):
                    self._catch_up(f)  # the entry whose newline was put back
                if mark is None:
                    self._start_mark(f)
                checked = f.seek(0, os.SEEK_END)
                before = _last_line(f, self.path)  # what the decision is made on, and what the entry will follow
                decision = decide()
                if isinstance(decision, dict):
                    return decision
                event, fields = decision
                if f.seek(0, os.SEEK_END) != checked or _last_line(f, self.path) != before or not _same_file(f, self.path):
                    raise AuditLogDamaged(f"{self.path} changed while the broker decided (written without the log's "
                                          f"lock: a copy put back?), so nothing was recorded; run `medtee broker "
                                          f"audit verify`")
                entry = _new_entry(before, event, fields)
                data = json.dumps(entry, sort_keys=True).encode() + b"\n"
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                end = checked + len(data)
                if (f.tell() != end or _hash_of_line(f, end) != entry["hash"] or not _same_file(f, self.path)
                        or (before is not None and _hash_of_line(f, checked) != before["hash"])):
                    raise AuditLogDamaged(f"{self.path} changed while the broker appended entry {entry['seq']} "
                                          f"(written without the log's lock: a copy put back?), so its decision is "
                                          f"not returned; run `medtee broker audit verify`")
                _write_mark(self.path, entry, end)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return entry

    def _start_mark(self, f) -> None:
        """A log with entries but no mark (from before marks, or a loss the owner accepted by removing it): record a
        `mark-start` entry, once, and mark it before anything is decided (AuditLogDamaged when the mark cannot be
        written)."""
        last = _last_line(f, self.path)
        if last is None:
            return
        end = f.seek(0, os.SEEK_END)
        if self._unmarked != (os.fstat(f.fileno()).st_ino, end, last["hash"]):  # not a retry of ours
            _log.warning("%s has no high-water mark: its %d entries are taken as whole (entry mark-start)",
                         self.path, last["seq"] + 1)
            last = _new_entry(last, "mark-start", {})
            f.write(json.dumps(last, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
            end = f.seek(0, os.SEEK_END)
        try:
            _write_mark(self.path, last, end)
        except AuditLogDamaged:
            self._unmarked = (os.fstat(f.fileno()).st_ino, end, last["hash"])  # the retry marks this mark-start
            raise
        self._unmarked = None

    def _catch_up(self, f) -> None:
        """Feed `index` the entries of `f` (its complete lines) it has not seen, from the start if the log changed
        under what it holds. Each entry must follow the one before it (seq and prev) and hash to its own `hash`, or
        AuditLogDamaged."""
        if self.index is None:
            return
        offset, last, seq = self._read
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if offset and (end < offset or _hash_of_line(f, offset) != last):
            self.index.reset()
            offset, last, seq = self._read = 0, None, -1
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):  # an unfinished last line: not an entry (`_drop_unfinished` cuts it)
                break
            if line.strip():
                entry = _line_entry(line)
                if entry is None:
                    raise AuditLogDamaged(f"{self.path}: the line at byte {offset} is not an audit entry; run `medtee "
                                          f"broker audit verify` and restore the log from a copy before the broker "
                                          f"records more")
                if entry.get("seq") != seq + 1 or entry.get("prev") != (last or GENESIS):
                    raise AuditLogDamaged(f"{self.path}: the entry at byte {offset} does not follow the one before "
                                          f"it (an entry removed, inserted or reordered); run `medtee broker audit "
                                          f"verify` and restore the log from a copy before the broker records more")
                if _entry_hash(entry) != entry.get("hash"):
                    raise AuditLogDamaged(f"{self.path}: the entry at byte {offset} was altered after it was "
                                          f"written; run `medtee broker audit verify` and restore the log from a "
                                          f"copy before the broker records more")
                self.index.add(entry)
                last, seq = entry["hash"], seq + 1
            offset += len(line)
            self._read = (offset, last, seq)


def _same_file(f, path: Path) -> bool:
    """Whether `path` still names the file open in `f` (not replaced by a rename, e.g. `mv copy audit.log`)."""
    try:
        here = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(f.fileno())
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _new_entry(prev: dict | None, event: str, fields: dict) -> dict:
    """The entry after `prev` (None: the first), chained to it."""
    entry = {
        "seq": prev["seq"] + 1 if prev else 0,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "event": event,
        **fields,
        "prev": prev["hash"] if prev else GENESIS,
    }
    entry["hash"] = _entry_hash(entry)
    return entry


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
    of an unfinished last line (an append that did not complete; the broker drops it at its next append);
    `mark_problem` when the chain is whole but the high-water mark refuses it (the problem names the fix)."""

    ok: bool
    entries: int
    head: str
    problem: str = ""
    unfinished: int = 0
    mark_problem: bool = False


def verify(path: Path | str, *, f=None, visit: Callable[[dict], None] | None = None) -> AuditReport:
    """Check the whole chain of the log at `path` (read from `f`, a binary file open on it, when given) and its
    high-water mark, when one is beside it; `visit(entry)` sees each entry once it checked, oldest first, in the
    same single pass."""
    path = Path(path)
    if f is not None:
        return _verify(path, f, visit)
    if not path.exists():
        if os.path.lexists(mark_path(path)):
            return AuditReport(False, 0, GENESIS, f"{path} does not exist, but its high-water mark "
                               f"{mark_path(path).name} says entries were appended to it; restore its newest copy",
                               mark_problem=True)
        return AuditReport(False, 0, GENESIS, f"{path} does not exist (removed, or this store has recorded no "
                           f"event yet); check the --broker-dir you passed")
    try:
        f = open_regular(path)[0]
    except (NotRegularFile, OSError) as e:
        return AuditReport(False, 0, GENESIS, _unreadable(path, e))
    with f:
        return _verify(path, f, visit)


def _unreadable(path: Path, error: Exception) -> str:
    if isinstance(error, NotRegularFile):
        return f"{path} {error}; restore the audit log there"
    return f"cannot read {path} ({getattr(error, 'strerror', None) or type(error).__name__}); fix its permissions"


def _verify(path: Path, f, visit: Callable[[dict], None] | None) -> AuditReport:
    prev, n, unfinished = GENESIS, 0, 0
    for lineno, line in enumerate(f, 1):
        if not line.endswith(b"\n"):  # only the last line can lack it
            end = f.seek(0, os.SEEK_END)
            whole = _whole_tail(f, end - len(line), end)  # an entry that lost only its newline: counted
            f.seek(end)  # where the iteration was
            if not whole:
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
        if visit is not None:
            visit(entry)
    try:
        behind = _behind_mark(f, path, _read_mark(path))
    except AuditLogDamaged as e:
        behind = str(e)
    if behind:
        return AuditReport(False, n, prev, behind, unfinished, mark_problem=True)
    return AuditReport(True, n, prev, unfinished=unfinished)
