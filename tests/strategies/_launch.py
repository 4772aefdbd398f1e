"""Launch a worker script on 2 CPU processes with ``torch.distributed.run`` (gloo), shared by the distributed tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NPROC = 2
TIMEOUT_S = 180


def free_port() -> int:
    """A free local port for an in-process (single-rank) process group; multi-process launches use torchrun's own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """What one ``torch.distributed.run`` job did."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str
    out: Path

    def describe(self) -> str:
        return (
            f"exit {self.returncode} after {self.seconds:.1f}s\n--- stderr ---\n{self.stderr[-6000:]}"
            f"\n--- stdout ---\n{self.stdout[-2000:]}"
        )


def launch(
    worker: Path,
    scenario: str,
    out: Path,
    timeout: float = TIMEOUT_S,
    nproc: int = NPROC,
    env: dict[str, str] | None = None,
) -> Launch:
    """Run ``worker scenario out`` on ``nproc`` processes (extra ``env`` on top of this process's environment);
    raises ``subprocess.TimeoutExpired`` if it hangs."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",  # the rendezvous picks a free port itself: no pick-then-bind race between parallel launches
        str(worker),
        scenario,
        str(out),
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return Launch(proc.returncode, time.monotonic() - start, proc.stdout, proc.stderr, out)


def rank_results(launch_: Launch, scenario: str, nproc: int = NPROC) -> list[dict[str, Any]]:
    """The per-rank JSON observations of a job that must have succeeded on every rank."""
    files = [launch_.out / f"{scenario}.rank{r}.json" for r in range(nproc)]
    assert launch_.returncode == 0 and all(f.exists() for f in files), (
        f"scenario {scenario!r} failed: {launch_.describe()}"
    )
    return [json.loads(f.read_text()) for f in files]


def scenario_runner(worker: Path, tmp_path_factory: Any) -> Callable[[str], list[dict[str, Any]]]:
    """For a module-scoped fixture: a function that runs each scenario of ``worker`` once, in its own temporary
    directory, and returns the per-rank observations (rank order) on every call."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def run(scenario: str) -> list[dict[str, Any]]:
        if scenario not in cache:
            cache[scenario] = rank_results(launch(worker, scenario, tmp_path_factory.mktemp(scenario)), scenario)
        return cache[scenario]

    return run
