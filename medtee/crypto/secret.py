"""SecretBuffer: key material in a mutable buffer that can be overwritten once it is no longer needed.

Limits, honestly: `wipe()` zeroes this buffer only. Copies are out of its reach: the `bytes` a key arrived in
(e.g. what HPKE unwrapping returned) until the garbage collector reuses its memory, slices and `bytes(buffer)`
(both copy), and whatever `cryptography`/OpenSSL or pyarrow copy into their own contexts (an AESGCM or HKDF
object keeps its key until it is freed). Nothing is locked in memory (no mlock): core dumps are turned off by the
containment (`medtee.containment`), and a production profile refuses to run while swap is on
(`medtee.hardware.swap_problem`, in the preflight before any key release); a development profile does not check
swap. It narrows how long a key stays in the process's memory; it does not make Python memory-safe.
"""

from __future__ import annotations


class SecretBuffer(bytearray):
    """A bytearray holding a secret: `wipe()` overwrites it with zeros in place, its repr hides the content, it
    cannot be pickled or copied with `copy`. Usable wherever bytes-like keys are accepted; `with` wipes on exit."""

    __slots__ = ()

    def wipe(self) -> None:
        """Overwrite every byte with zero, in place (the length stays, so a wiped key fails its key check)."""
        memoryview(self)[:] = bytes(len(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} bytes, hidden)"

    __str__ = __repr__

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} holds a secret and cannot be pickled or copied; use it in place")

    __reduce__ = __reduce_ex__

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.wipe()
