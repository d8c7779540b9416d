"""The end of a run, success or failure: key material and decrypted records overwritten where Python allows and
dropped, and a record of it for the key broker's audit log and the receipt.

What "where Python allows" means: keys held in `SecretBuffer`s are zeroed in place; the data module's token arrays
(the only form in which decrypted records are kept) are zeroed in place; objects whose memory Python cannot reach
(private keys inside `cryptography`/OpenSSL, the decrypted strings a tokenizer read) are dropped, and the record
says so. The record holds fixed words and counts only, never a value.
"""

from __future__ import annotations

from collections.abc import Callable

from medtee.crypto.secret import SecretBuffer


class Teardown:
    """What the run must destroy, registered as it is created; `destroy()` once at the end (it is idempotent)."""

    def __init__(self) -> None:
        self._keys: dict[str, SecretBuffer] = {}
        self._data: dict[str, Callable[[], int]] = {}
        self._destroyed: dict[str, int] = {}  # examples already destroyed under a name (a sweep's earlier trials)
        self._dropped: dict[str, str] = {}
        self._record: dict | None = None

    def key(self, name: str, buffer: SecretBuffer) -> SecretBuffer:
        """Register key material to zero at the end; returns `buffer`."""
        if not isinstance(buffer, SecretBuffer):
            raise TypeError(f"teardown: key {name} must be a SecretBuffer, so it can be overwritten in place")
        self._keys[name] = buffer
        return buffer

    def data(self, name: str, destroy: Callable[[], int]) -> None:
        """Register decrypted data: `destroy()` overwrites and drops it and returns how many examples it held. A new
        holder under a registered name (the next trial of a sweep) destroys the one it replaces now."""
        if name in self._data:
            self._destroyed[name] = self._destroyed.get(name, 0) + self._data[name]()
        self._data[name] = destroy

    def dropped(self, name: str, how: str) -> None:
        """Record something Python cannot overwrite (its references are dropped): `how` says where it lived."""
        self._dropped[name] = how

    def wipe(self, name: str) -> None:
        """Zero the key `name` now, before the end (it stays registered: the record lists it)."""
        self._keys[name].wipe()

    def destroy(self) -> dict:
        """Zero every key, destroy every data holder, drop the references; the teardown record."""
        if self._record is None:
            keys = {}
            for name, buffer in self._keys.items():
                buffer.wipe()
                keys[name] = f"overwritten with zeros ({len(buffer)} bytes)"
            data = {name: f"token arrays overwritten with zeros and dropped "
                          f"({destroy() + self._destroyed.get(name, 0)} examples)"
                    for name, destroy in self._data.items()}
            self._keys, self._data = {}, {}
            self._record = {"keys": keys, "decrypted_data": data, "dropped": dict(sorted(self._dropped.items()))}
        return self._record

    def summary(self) -> str:
        """One line for the terminal: what was destroyed."""
        record = self.destroy()
        parts = [f"{', '.join(record['keys'])} overwritten" if record["keys"] else "",
                 f"{', '.join(record['decrypted_data'])} overwritten" if record["decrypted_data"] else "",
                 f"{', '.join(record['dropped'])} dropped" if record["dropped"] else ""]
        return "; ".join(p for p in parts if p)
