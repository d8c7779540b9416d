"""How fast `medtee --help` and a configuration error answer, against a bare Python start in the same process.

Usage: python benchmarks/cli_startup.py [--repeats 7]
Prints the median wall time of each command and, last, `ratio config-error/python: X`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str], cwd: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    cwd = tempfile.mkdtemp()
    py = [sys.executable]
    results = {
        "python -c pass": wall(py + ["-c", "pass"], cwd, args.repeats),
        "medtee --help": wall(py + ["-m", "medtee", "--help"], cwd, args.repeats),
        "medtee train qlora.rnak=8 (exit 2)": wall(py + ["-m", "medtee", "train", "qlora.rnak=8"], cwd, args.repeats),
        "medtee recipes validate": wall(py + ["-m", "medtee", "recipes", "validate"], cwd, args.repeats),
    }
    for name, seconds in results.items():
        print(f"{name:40s} {seconds * 1000:8.0f} ms")
    base = results["python -c pass"]
    print(f"ratio help/python: {results['medtee --help'] / base:.2f}")
    print(f"ratio config-error/python: {results['medtee train qlora.rnak=8 (exit 2)'] / base:.2f}")


if __name__ == "__main__":
    main()
