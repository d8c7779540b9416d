"""`python rotation_crash.py TEMPLATE OUT`: for N = 1, 2, ... copy the store TEMPLATE/broker and the dataset
TEMPLATE/sealed to OUT/N, and rotate them in a forked child that dies (os._exit, no cleanup runs) just before
its Nth file-system step (rename, fsync, unlink, rmdir); stops at the first N the rotation outlives. Prints the
number of crash points."""

from __future__ import annotations

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


def main(template: Path, out: Path) -> int:
    from medtee.broker.store import rotate

    n = 0
    while True:
        n += 1
        case = out / str(n)
        shutil.copytree(template / "broker", case / "broker")
        shutil.copytree(template / "sealed", case / "sealed")
        pid = os.fork()
        if pid == 0:
            crash_before(n)
            rotate(case / "broker", [case / "sealed"], scheme="hpke-x25519")
            os._exit(0)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == 0:
            print(n - 1)
            return 0
        if code != 17:
            print(f"rotation failed with exit code {code} at crash point {n}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
