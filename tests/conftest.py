"""Shared fixtures: the ../shared directory (skip when absent) and a clean working directory per test; the workers
the suite runs on, and one CPU thread for each process a test starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs on one pytest-xdist worker per CPU (pyproject.toml). torch's default of one thread per CPU in each of
# them would oversubscribe the machine (on 2 cores, 2 workers x 2 threads ran the training tests 2-4x slower than
# alone); the tiny models train as fast on one. Set before torch is imported here or in any process a test starts.
# Runs a test compares are made under the same count, so their sums round alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): the public dialogues and vectors live there, beside the repo")
    return SHARED


def run_medtee(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `medtee ARGS` in a process of its own, capturing stdout and stderr: forked from a server that imported the
    heavy libraries once (`forkserver`), or with `fresh` (or MEDTEE_TEST_FORKSERVER=0) as a user does, `python -m
    medtee` from scratch."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if fresh or os.environ.get("MEDTEE_TEST_FORKSERVER") == "0":
        return subprocess.run([sys.executable, "-m", "medtee", *args], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    import forkserver

    return forkserver.client().run(list(args), cwd=cwd, env=full_env, timeout=timeout)


def run_python(program: str | Path, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -c PROGRAM ARGS` (a str) or `python PROGRAM ARGS` (a Path) in a process of its own, capturing stdout
    and stderr: forked from the fork server as `run_medtee` is (or fresh with MEDTEE_TEST_FORKSERVER=0). For scripts
    that patch medtee, then run its CLI."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cwd = Path.cwd() if cwd is None else cwd
    if os.environ.get("MEDTEE_TEST_FORKSERVER") == "0":
        head = ["-c", program] if isinstance(program, str) else [str(program)]
        return subprocess.run([sys.executable, *head, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    import forkserver

    which = {"code": program} if isinstance(program, str) else {"path": str(program)}
    return forkserver.client().run(list(args), cwd=cwd, env=full_env, timeout=timeout, **which)


def start_python(program: str | Path | None, *args: str, cwd: Path, env: dict | None = None):
    """Start `python -c PROGRAM ARGS` (a str), `python PROGRAM ARGS` (a Path) or `python -m medtee ARGS` (None) in a
    session of its own (so `os.killpg(p.pid, ...)` reaches it), forked as `run_python` is: a Popen-like object whose
    `stderr` is read as it is written, with `poll`, `wait` and `communicate`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if os.environ.get("MEDTEE_TEST_FORKSERVER") == "0":
        head = ["-m", "medtee"] if program is None else ["-c", program] if isinstance(program, str) else [str(program)]
        return subprocess.Popen([sys.executable, *head, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    import forkserver

    which = {} if program is None else {"code": program} if isinstance(program, str) else {"path": str(program)}
    return forkserver.client().start(list(args), cwd=cwd, env=full_env, new_session=True, **which)


@pytest.fixture(scope="session", autouse=True)
def _close_forkserver():
    yield
    if "forkserver" in sys.modules:
        sys.modules["forkserver"].close()


def seal_and_train(cwd: Path, *train_args: str) -> tuple[Path, str]:
    """120 synthetic dialogues (seed 5) sealed in `cwd` under the simulated policy, then `medtee train` with
    `train_args`: (the run's directory, its stderr)."""
    assert run_medtee("synth", "--n", "120", "--seed", "5", "--out", "d.jsonl", cwd=cwd).returncode == 0
    assert run_medtee("seal", "d.jsonl", "--out", "sealed", "--policy", "simulated", cwd=cwd).returncode == 0
    res = run_medtee("train", *train_args, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = cwd.glob("outputs/*/*/summary.json")
    return summary.parent, res.stderr


def pytest_xdist_auto_num_workers(config) -> int:
    """`--numprocesses=auto`: one worker per CPU this process may run on (not per physical core: a 2-vCPU machine
    counts 2), at most 8, each with its own fork server holding torch."""
    return max(1, min(8, len(os.sched_getaffinity(0))))
