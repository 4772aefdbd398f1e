"""How a distributed test worker ends: write this rank's observations, tear the process group down, and leave
without interpreter finalization.

Why not a normal exit: a gloo worker thread drops the last reference to a finished collective's ``Work`` after the
caller has been woken; the ``Work`` holds tensors with Python objects, so the drop takes the GIL. If the main thread
is already finalizing the interpreter, CPython 3.11-3.13 ends that thread with ``pthread_exit`` inside a ``noexcept``
destructor and libstdc++ aborts the process ("terminate called without an active exception", SIGABRT) after all of
its work is done. ``destroy_process_group()`` and a barrier narrow the window but do not close it: gloo's
``shutdown`` leaves the worker threads running. ``tools/gloo_exit_abort_repro.py`` reproduces it with torch alone
(pytorch/pytorch#190489). Ending with ``os._exit(0)`` skips finalization, so nothing can take the GIL then.

What this cannot hide: ``os._exit`` is reached only after the result file is complete, so a worker that fails
earlier exits non-zero (its exception propagates) and leaves no result for the test to read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist


def finish(out: Path, scenario: str, rank: int, result: dict[str, Any]) -> NoReturn:
    """Write ``result`` as ``{scenario}.rank{rank}.json`` under ``out`` (complete or absent, never partial), wait for
    every rank, destroy the group and end the process with exit status 0."""
    target = out / f"{scenario}.rank{rank}.json"
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, target)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
