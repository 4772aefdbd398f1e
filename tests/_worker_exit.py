"""How a distributed test worker ends: write this rank's observations, then tear the process group down cleanly.

A gloo process group left for interpreter shutdown can abort the process ("terminate called without an active
exception") after the work is done, which fails a launch that succeeded; destroying it explicitly avoids that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist


def finish(out: Path, scenario: str, rank: int, result: dict[str, Any]) -> None:
    """Write ``result`` as ``{scenario}.rank{rank}.json`` under ``out``, then wait for every rank and destroy the group."""
    (out / f"{scenario}.rank{rank}.json").write_text(json.dumps(result, indent=1))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
