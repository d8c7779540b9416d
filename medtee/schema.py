"""What every config schema shares: the error a bad recipe raises and the check of numeric floors. Imports nothing
heavy."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and what is valid."""


def below_minimums(section, group: str, minimums: Mapping[str, float]) -> list[str]:
    """`GROUP.FIELD=V must be at least M` for each dotted field of `section` below its floor (None is skipped)."""
    out = []
    for dotted, minimum in minimums.items():
        value = section
        for part in dotted.split("."):
            value = getattr(value, part)
        if value is not None and value < minimum:
            out.append(f"{group}.{dotted}={value} must be at least {minimum}")
    return out
