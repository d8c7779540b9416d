"""A sweep worker for the tests: a fake runner (a deterministic function of the overrides, no model) and a command
line running one worker that can SIGKILL itself at a chosen point:

    python sweep_worker.py --storage URL --mlflow URI [--n-trials N] [--worker ID] [--kill PHASE --at K]

PHASE is where the K-th trial of this process dies: `asked` (heartbeat on, no MLflow child yet), `mid` (inside the
runner) or `told` (after Optuna's tell, the MLflow child still RUNNING).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import time
from pathlib import Path

#: Text of the deliberate failure: it must never reach the study or MLflow.
CANARY = "PATIENT-CANARY-7f3e leaked exception message"

SPACE = {
    "name": "test_study",
    "objective": "val/loss",
    "direction": "minimize",
    "sampler": "tpe",
    "n_trials": 5,
    "seed": 1,
    "heartbeat_s": 1,
    "grace_s": 3,
    "parameters": {
        "trainer.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "qlora.rank": {"type": "categorical", "choices": [4, 8, 16]},
    },
}


class FakeRunner:
    """`val/loss` from the overrides alone; fails (with CANARY as message) on the trial numbers in `fail_on`."""

    def __init__(self, *, fail_on=(), delay: float = 0.0, log: Path | None = None, die_mid: int | None = None):
        self.fail_on, self.delay, self.log, self.die_mid = set(fail_on), delay, log, die_mid
        self.calls = 0

    def run(self, overrides: list[str], trial_number: int) -> dict[str, float]:
        self.calls += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{trial_number} {' '.join(overrides)}\n")
                f.flush()
                os.fsync(f.fileno())
        time.sleep(self.delay)
        if self.calls == self.die_mid:
            os.kill(os.getpid(), signal.SIGKILL)
        if trial_number in self.fail_on:
            raise RuntimeError(CANARY)
        values = dict(o.split("=", 1) for o in overrides)
        loss = (math.log10(float(values["trainer.lr"])) + 3.5) ** 2 + 1.0 / int(values["qlora.rank"])
        return {"val/loss": loss, "train/loss": loss + 0.1, "not/allowed": 1.0}


def guard():
    from medtee.tracking.guard import Guard

    g = Guard(None, min_aggregate=20)
    g.eval_examples = 100
    return g


def space(**changes):
    from medtee.sweep.config import from_section

    return from_section({**SPACE, **changes})


def _die_on_call(cls, name: str, k: int) -> None:
    """Make the k-th call of cls.name SIGKILL this process before it does anything."""
    original, calls = getattr(cls, name), [0]

    def wrapper(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--mlflow", required=True)
    parser.add_argument("--n-trials", type=int, default=5)
    parser.add_argument("--worker", default="w0")
    parser.add_argument("--kill", choices=("asked", "mid", "told"))
    parser.add_argument("--at", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()

    from medtee.sweep.engine import run_sweep
    from medtee.sweep.tracking import SweepTracker

    if args.kill == "asked":
        _die_on_call(SweepTracker, "start_trial", args.at)
    if args.kill == "told":
        _die_on_call(SweepTracker, "finish_trial", args.at)
    runner = FakeRunner(delay=args.delay, log=args.log, die_mid=args.at if args.kill == "mid" else None)
    g = guard()
    tracker = SweepTracker(tracking_uri=args.mlflow, experiment="sweeps", guard=g)
    result = run_sweep(space(n_trials=args.n_trials), runner, storage_url=args.storage, worker_id=args.worker,
                       guard=g, tracker=tracker)
    print(f"stopped={result.stopped} complete={result.complete} failed={result.failed} ran={runner.calls}")


if __name__ == "__main__":
    main()
