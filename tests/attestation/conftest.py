"""Shared helpers for the attestation tests: locating ../shared/vectors."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
VECTORS = SHARED / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip("../shared is absent: the real attestation vectors live in ../shared/vectors")
    return VECTORS
