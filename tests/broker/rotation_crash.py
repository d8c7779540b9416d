"""Crash injection for broker-key rotation: a forked child dies (os._exit: no clean-up runs) just before its Nth
file-system step (rename, fsync, unlink, rmdir), for N = 1, 2, ... until the work outlives N.

`python rotation_crash.py rotate TEMPLATE OUT`: copies of TEMPLATE/broker and TEMPLATE/sealed in OUT/N, each rotated
by a child that dies at step N. `python rotation_crash.py open OUT CASE...`: copies of each CASE in OUT/<case>-N,
each opened by an EmbeddedBroker (which finishes or removes an interrupted rotation) in a child that dies at step N.
Prints the number of copies made."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

STEPS = ("replace", "fsync", "unlink", "rmdir")


def crash_before(n: int) -> None:
    count = [0]
    for name in STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == n:
                os._exit(17)
            return _real(*args, **kwargs)

        setattr(os, name, step)


def crash_each(case, copy, work) -> int:
    """Copies made by `copy(n)` worked on by `work(n)` dying at step n, until one lives; how many were made."""
    n = 0
    while True:
        n += 1
        copy(n)
        pid = os.fork()
        if pid == 0:
            crash_before(n)
            work(n)
            os._exit(0)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == 0:
            return n
        if code != 17:
            raise SystemExit(f"{case}: exit code {code} at crash point {n}")


def main(mode: str, args: list[str]) -> int:
    from medtee.broker.service import EmbeddedBroker
    from medtee.broker.store import rotate

    made = 0
    if mode == "rotate":
        template, out = map(Path, args)

        def copy(n):
            for part in ("broker", "sealed"):
                shutil.copytree(template / part, out / str(n) / part)

        made = crash_each(template, copy, lambda n: rotate(out / str(n) / "broker", [out / str(n) / "sealed"],
                                                           scheme="hpke-x25519"))
    else:
        out, *cases = map(Path, args)
        for case in cases:
            def copy(n, case=case):
                shutil.copytree(case, out / f"{case.name}-{n}")
                plan = out / f"{case.name}-{n}" / "broker" / "rotating" / "plan.json"
                if plan.exists():  # the copy's dataset directory, not the case's
                    doc = json.loads(plan.read_text())
                    doc["dataset_dirs"] = {i: str(out / f"{case.name}-{n}" / "sealed") for i in doc["dataset_dirs"]}
                    plan.write_text(json.dumps(doc))

            made += crash_each(case, copy, lambda n, case=case: EmbeddedBroker(out / f"{case.name}-{n}" / "broker").close())
    print(made)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
