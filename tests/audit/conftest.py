"""Fixtures of the audit tests: a broker store in tmp_path, synthetic dialogues, and a scanner for canaries."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def broker(tmp_path):
    from medtee.broker.service import EmbeddedBroker

    return EmbeddedBroker(tmp_path / "broker")


def dialogues(n: int, seed: int = 3) -> list[dict]:
    from medtee.data.synthetic import generate_dialogues

    return generate_dialogues(n, seed=seed)


def canary_forms(canaries) -> list[bytes]:
    """The byte forms a leaked canary could take: its number and sentence, as UTF-8 and UTF-16."""
    texts = [t for c in canaries for t in (f"{c.number:0{c.space.digits}d}", c.text)]
    return [t.encode(enc) for t in texts for enc in ("utf-8", "utf-16-le", "utf-16-be")]


def leaks(canaries, paths: list[Path], texts: dict[str, str] | None = None) -> list[str]:
    """Every place under `paths` (files, recursively) or among `texts` that holds a canary in any form."""
    blobs = {name: text.encode() for name, text in (texts or {}).items()}
    for root in paths:
        blobs |= {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
    forms = canary_forms(canaries)
    return [where for where, blob in blobs.items() if any(form in blob for form in forms)]
