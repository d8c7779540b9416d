"""Where medtee's shipped configuration lives, in a source checkout and in an installed wheel."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    # A wheel carries the directories inside the package (`medtee/_shipped/<name>`); a source checkout or an
    # editable install has them at the repository root.
    for candidate in (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"medtee's '{name}/' directory is missing from this installation ({_PACKAGE}); reinstall medtee")


@cache
def conf_dir() -> Path:
    """The Hydra config groups (`conf/`)."""
    return _locate("conf")


@cache
def recipes_dir() -> Path:
    """The shipped recipes (`recipes/`)."""
    return _locate("recipes")
