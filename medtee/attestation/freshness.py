"""Rollback protection for cached revocation documents: the newest of each that an appraiser has accepted.

AMD's CRLs and NVIDIA's OCSP responses are read from caches an operator refreshes, and each counts while its
validity window is current. An older copy still inside its window could be put back, undoing a revocation the newer
one carries. An appraiser that keeps a `Newest` (the key broker: `<store>/revocation-seen.json`) refuses a document
issued before the newest of its kind it accepted, or a CRL with a lower CRL number, as "not established". A document
that revokes counts whatever its age: revocation is never undone.
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

    def admit(self, kind: str, issued: datetime, number: int | None = None) -> str | None:
        """None when document `kind` issued at `issued` (with CRL number `number`) is not older than the newest one
        accepted before, and record it when it is newer; else why it is refused."""
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                seen = json.loads(self.path.read_text()) if self.path.exists() else {}
                prior = seen.get(kind)
                before = datetime.fromisoformat(prior["issued"]) if prior else None
                before_number = prior.get("number") if prior else None
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                return (f"unusable: {self.path} (the newest revocation documents accepted) is damaged; restore it "
                        f"from a backup (removing it forgets every document accepted, so an older copy could be put "
                        f"back unnoticed)")
            if before is not None and (issued < before or (None not in (number, before_number)
                                                            and number < before_number)):
                newer = f"of {before.isoformat()}" + (f", CRL number {before_number}" if before_number is not None
                                                      else "")
                return (f"older than one accepted before ({newer}): an older copy was put back in the cache; "
                        f"fetch the current one")
            if before is None or issued > before or (number or 0) > (before_number or 0):
                seen[kind] = {"issued": issued.isoformat(), "number": number}
                write_atomic(self.path, json.dumps(seen, sort_keys=True, indent=1).encode(), mode=0o600)
        return None
