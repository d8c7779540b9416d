"""Rollback protection for cached revocation documents: the newest of each that an appraiser has accepted.

AMD's CRLs and NVIDIA's OCSP responses are read from caches an operator refreshes, and each counts while its
validity window is current. An older copy still inside its window could be put back, undoing a revocation the newer
one carries. An appraiser that keeps a `Newest` (the key broker: `<store>/revocation-seen.json`) refuses a document
issued before the newest of its kind it accepted, or a CRL with a lower CRL number, under every revocation stance
(it is not a missing answer: someone put an older copy back). A document that revokes counts whatever its age, and
revocation is never undone: once one revoked a certificate, a later answer saying otherwise is refused too (a
certificateHold counts as a revocation, for good: AMD and NVIDIA do not suspend certificates).
"""

from __future__ import annotations

import fcntl
import json
import threading
from datetime import datetime
from pathlib import Path

from medtee.files import write_atomic


DAMAGED = ("unusable: {path} (the newest revocation documents accepted) is damaged; restore it from a backup (removing "
           "it forgets every document accepted, so an older copy could be put back unnoticed)")


class _Damaged(Exception):
    pass


def _when(value: object) -> datetime:
    when = datetime.fromisoformat(value)  # TypeError for a non-string
    if when.tzinfo is None:
        raise ValueError("a time without its zone")
    return when


class Newest:
    """The issue time (and CRL number) of the newest document of each kind accepted, and the first that revoked it,
    in a JSON file; safe across threads and processes (a lock file beside it)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict:
        """The whole record, each kind's entry checked; _Damaged when it is not one."""
        try:
            seen = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(seen, dict):
                raise TypeError("not an object")
            for record in seen.values():
                _when(record["issued"])
                if record.get("number") is not None and type(record["number"]) is not int:
                    raise TypeError("a CRL number that is no integer")
                if record.get("revoked") is not None:
                    _when(record["revoked"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise _Damaged(DAMAGED.format(path=self.path)) from None
        return seen

    def standing(self, kind: str) -> str | None:
        """Why `kind` fails whatever document the cache holds now, or lacks: a document accepted before revoked it
        (revocation is never undone), or the record is damaged; None otherwise. Writes nothing."""
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                revoked = (self._read().get(kind) or {}).get("revoked")
            except _Damaged as e:
                return str(e)
        return (f"revoked by a document of {revoked} accepted before (revocation is never undone, whatever the cache "
                f"holds now)" if revoked else None)

    def admit(self, kind: str, issued: datetime, number: int | None = None, *, revokes: bool = False) -> str | None:
        """None when document `kind` issued at `issued` (with CRL number `number`) may count: it revokes
        (`revokes`, recorded for good whatever its age), or it is not older than the newest one accepted before and
        no document accepted before revoked what it is about. Records it when it is newer; else why it is refused."""
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                seen = self._read()
            except _Damaged as e:
                return str(e)
            prior = dict(seen.get(kind) or {})
            before = _when(prior["issued"]) if prior else None
            before_number = prior.get("number")
            revoked = prior.get("revoked")
            older = before is not None and (issued < before or (None not in (number, before_number)
                                                                 and number < before_number))
            record = dict(prior)
            if revokes and revoked is None:
                record["revoked"] = issued.isoformat()
            if not older and (before is None or issued > before or (number or 0) > (before_number or 0)):
                record.update(issued=issued.isoformat(), number=number)
            if record != prior:
                seen[kind] = record
                write_atomic(self.path, json.dumps(seen, sort_keys=True, indent=1).encode(), mode=0o600)
        if revokes:
            return None
        if revoked is not None:
            return (f"says not revoked, but one of {revoked} accepted before revoked it, and revocation is never "
                    f"undone")
        if older:
            newer = f"of {before.isoformat()}" + (f", CRL number {before_number}" if before_number is not None else "")
            return (f"older than one accepted before ({newer}): an older copy was put back in the cache; fetch the "
                    f"current one")
        return None
