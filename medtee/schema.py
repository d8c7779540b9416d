"""What every config schema shares: the error a bad recipe raises and the check of numeric floors. Imports nothing
heavy."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and what is valid."""


MAX_INT = 2**63 - 1


def below_minimums(section, group: str, minimums: Mapping[str, float]) -> list[str]:
    """`GROUP.FIELD=V must be at least M` for each dotted field of `section` below its floor (None is skipped); a
    float must be finite and an int fit in 64 bits (a count past that overflows the libraries that get it)."""
    import math

    out = []
    for dotted, minimum in minimums.items():
        value = section
        for part in dotted.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{group}.{dotted}={value} must be a finite number, at least {minimum}")
        elif value < minimum:
            out.append(f"{group}.{dotted}={value} must be at least {minimum}")
        elif isinstance(value, int) and value > MAX_INT:
            out.append(f"{group}.{dotted}={value} must be at most {MAX_INT} (2^63 - 1)")
    return out
