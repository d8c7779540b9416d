"""Rollback protection for cached revocation documents: the newest of each that an appraiser has accepted.

AMD's CRLs and NVIDIA's OCSP responses are read from caches an operator refreshes, and each counts while its
validity window is current. An older copy still inside its window could be put back, undoing a revocation the newer
one carries. An appraiser that keeps a `Newest` (the key broker: `<store>/revocation-seen.json`) refuses a document
issued before the newest of its kind it accepted, or a CRL with a lower CRL number, under every revocation stance
(it is not a missing answer: someone put an older copy back). A document that revokes counts whatever its age, and
revocation is never undone: once one revoked a certificate, a later answer saying otherwise is refused too.
"""

from __future__ import annotations

import fcntl
import json
import threading
from datetime import datetime
from pathlib import Path

from medtee.files import write_atomic


class Newest:
    """The issue time (and CRL number) of the newest document of each kind accepted, in a JSON file; safe across
    threads and processes (a lock file beside it)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def admit(self, kind: str, issued: datetime, number: int | None = None, *, revokes: bool = False) -> str | None:
        """None when document `kind` issued at `issued` (with CRL number `number`) may count: it revokes
        (`revokes`, recorded for good whatever its age), or it is not older than the newest one accepted before and
        no document accepted before revoked what it is about. Records it when it is newer; else why it is refused."""
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                seen = json.loads(self.path.read_text()) if self.path.exists() else {}
                prior = dict(seen.get(kind) or {})
                before = datetime.fromisoformat(prior["issued"]) if prior else None
                before_number = prior.get("number")
                revoked = prior.get("revoked")
                if revoked is not None:
                    datetime.fromisoformat(revoked)
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                return (f"unusable: {self.path} (the newest revocation documents accepted) is damaged; restore it "
                        f"from a backup (removing it forgets every document accepted, so an older copy could be put "
                        f"back unnoticed)")
            older = before is not None and (issued < before or (None not in (number, before_number)
                                                                 and number < before_number))
            record = dict(prior)
            if revokes and revoked is None:
                record["revoked"] = issued.isoformat()
            if before is None or issued > before or (number or 0) > (before_number or 0):
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
