"""What a study may store: allow-listed attribute keys whose values are numbers, booleans or short identifiers.

An Optuna study is read by whoever reads its database (optuna-dashboard, another worker), so it holds what an
MLflow run may hold and less: no free text, no exception messages, no paths. Imports nothing heavy.
"""

from __future__ import annotations

import math
from typing import Any

from medtee.sweep.config import IDENTIFIER

#: Study user attributes the engine writes: the objective's metric name, its direction, the trials wanted.
STUDY_ATTRS = ("objective", "direction", "n_trials")

#: Trial user attributes the engine writes: the worker that ran it and, for a failed trial, the exception TYPE.
TRIAL_ATTRS = ("worker", "error")


class StudyGuardError(ValueError):
    """The engine was about to store something a study may not hold (a bug: the message names the key only)."""


def plain(value: Any) -> bool:
    """A finite number, a boolean, None, a short identifier, or a list or mapping of those (identifier keys)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, str):
        return IDENTIFIER.fullmatch(value) is not None
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and IDENTIFIER.fullmatch(k) and plain(v) for k, v in value.items())
    return False


def checked(key: str, value: Any, allowed: tuple[str, ...]) -> Any:
    """`value`, when `key` is allow-listed and the value plain; else StudyGuardError naming the key, not the value."""
    if key not in allowed:
        raise StudyGuardError(f"study attribute {key!r} is not in the allow-list ({', '.join(allowed)})")
    if not plain(value):
        raise StudyGuardError(f"study attribute {key!r}: only numbers and short identifiers may be stored")
    return value
