"""Minimal reproduction, without lightning_precision, of the abort at exit of 2-process gloo jobs.

The fault: a gloo worker thread (``ProcessGroupGloo::runLoop``) drops the last reference to a finished collective's
``Work`` after the caller has been woken. The ``Work`` holds tensors that have Python objects, so dropping it
decrefs them, which takes the GIL. If the main thread has meanwhile reached interpreter finalization, CPython
(3.11-3.13) answers ``take_gil`` with ``pthread_exit``; the forced unwind meets the ``noexcept`` destructor and
libstdc++ calls ``std::terminate``: "terminate called without an active exception", SIGABRT, after the program's
work is done. ``destroy_process_group()`` does not help: gloo's ``shutdown`` leaves the worker threads running.
Upstream: pytorch/pytorch#190489 (torch's ``decref`` guards on ``Py_IsInitialized`` only).

Run ``python tools/gloo_exit_abort_repro.py --runs 40`` to count aborts; ``--exit os`` ends each rank with
``os._exit(0)`` after its work, which skips finalization and never aborts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def worker(exit_mode: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    # Collectives on fresh tensors, the last one as close to the end of the program as a test worker's last check.
    import torch.distributed._functional_collectives as funcol

    # The last collectives right before the end, as a test worker's final check: functional all-gathers (what
    # ``DTensor.full_tensor()`` runs), each waited for.
    for _ in range(20):
        gathered = funcol.all_gather_tensor(torch.randn(4096), 0, dist.group.WORLD)
        float(gathered.sum())  # waits for the collective
    dist.destroy_process_group()
    if exit_mode == "os":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def drive(runs: int, exit_mode: str) -> int:
    aborts = 0
    started = time.monotonic()
    for i in range(runs):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__,
             "--worker", "--exit", exit_mode],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        aborted = proc.returncode != 0 and "terminate called without an active exception" in proc.stderr
        aborts += aborted
        if proc.returncode != 0 and not aborted:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"run {i} failed with something else (exit {proc.returncode})")
    print(f"exit={exit_mode}: {aborts}/{runs} runs aborted at exit ({time.monotonic() - started:.0f} s)")
    return aborts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--exit", choices=["normal", "os"], default="normal", dest="exit_mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.exit_mode)
    else:
        drive(args.runs, args.exit_mode)
