"""Run the distributed tests many times, optionally beside CPU load, and count the runs that failed.

A test that fails one run in five is a broken test; this is how to see it before CI does. Each run is a fresh
``python -m pytest -m distributed`` (a new interpreter, as in CI); ``--load N`` keeps N busy-looping processes
running beside it, as on a loaded CI machine. Prints one line per run and then failures/N with the failing ids.

    python tools/stress_distributed.py --runs 20 --load 2
    python tools/stress_distributed.py --runs 5 -- tests/optim/test_compensated_adamw_distributed.py

Exit status: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    while True:
        pass


def _failed_ids(junit: Path) -> list[str]:
    """The ids of the tests that failed or errored in one pytest run's JUnit XML report."""
    if not junit.exists():
        return ["<no report: pytest itself failed>"]
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/")
            failed.append(f"{path}.py::{case.get('name')}")
    return failed


def stress(runs: int, load: int, pytest_args: list[str]) -> int:
    burners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    for b in burners:
        b.start()
    failures: collections.Counter[str] = collections.Counter()
    failed_runs = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(1, runs + 1):
                junit = Path(tmp) / f"run{i}.xml"
                start = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "distributed",
                     f"--junitxml={junit}", *pytest_args],
                    cwd=ROOT, capture_output=True, text=True, check=False,
                )  # fmt: skip
                failed = _failed_ids(junit) if proc.returncode else []
                if proc.returncode and not failed:
                    failed = [f"<pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}>"]
                failed_runs += bool(failed)
                failures.update(failed)
                status = "ok" if not failed else "FAILED " + ", ".join(failed)
                print(f"run {i:3d}/{runs}  {time.monotonic() - start:6.1f} s  {status}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    print(f"\n{failed_runs}/{runs} runs failed (load: {load} busy processes beside the tests)")
    for test_id, count in failures.most_common():
        print(f"  {count}x {test_id}")
    return 1 if failed_runs else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="how many full runs (default 10)")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes beside the tests (default 0)")
    parser.add_argument("pytest_args", nargs="*", help="after --: test paths or pytest options")
    args = parser.parse_args()
    if args.runs < 1 or args.load < 0:
        parser.error(f"--runs must be >= 1 and --load >= 0 (got --runs {args.runs}, --load {args.load})")
    raise SystemExit(stress(args.runs, args.load, args.pytest_args))


if __name__ == "__main__":
    main()
