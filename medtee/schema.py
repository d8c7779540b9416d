"""What every config schema shares: the error a bad recipe raises, the check of numeric floors, and which fields the
recipe digest leaves out or covers by file content (`config.digest_input`; a release policy's setting rules read
them too). Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and what is valid."""


MAX_INT = 2**63 - 1
_MISSING = object()


def differing(a: object, b: object, path: str = "") -> list[str]:
    """The dotted keys, sorted, at which two nested mappings (recipes, policies as recorded) differ: a key one lacks,
    or values unequal or of another type (1 is not 1.0 nor true)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(a.keys() | b.keys())
                for d in differing(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else key)]
    return [] if type(a) is type(b) and a == b else [path]

#: Fields excluded from the recipe digest, and why they cannot change what runs: `data.path` is where this machine
#: keeps the sealed dataset, which the key release binds by dataset id and manifest digest; `tracking.run_name` is
#: a label on the MLflow run; `broker.dir` is the embedded (development) broker's store, and production profiles
#: require a remote broker, whose URL is in the digest.
NOT_IN_DIGEST = ("data.path", "tracking.run_name", "broker.dir")

#: Fields that name a file: the digest covers the file's content (sha256), not its path, so replacing the file
#: changes the digest. (The pretrained weights enter it through `config.digest_input(weights=...)`.)
FILES_IN_DIGEST = (("output", "recipient"), ("broker", "ca"), ("trainer", "resume_from"), ("evaluation", "adapter"),
                   ("evaluation", "study_recipient"), ("evaluation", "blinding_recipient"))


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
