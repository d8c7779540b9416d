"""Shared fixtures: the ../shared directory (skip when absent) and a clean working directory per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): the public dialogues and vectors live there, beside the repo")
    return SHARED


def run_medtee(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `medtee` command the way a user does, capturing stdout and stderr."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "medtee", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
