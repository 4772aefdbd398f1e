"""What the benchmark scripts share: a quiet CPU trainer, a step timer, a small MLP with random regression data,
resident bytes of a (sharded) optimizer, and running a script on several CPU processes.

The scripts import it as ``import harness``: ``python benchmarks/<script>.py`` puts the script's own folder first on
``sys.path``. The library itself comes from the installed package (``pip install -e .``), so no script edits
``sys.path``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_precision.memory import measure_bytes_per_param

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (default output paths such as ``docs/img/`` are relative to it)."""


def trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU ``pl.Trainer`` without logger, checkpoints, progress bar or model summary; ``kwargs`` add or override."""
    quiet = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**quiet, **kwargs})


class StepTimer(pl.Callback):
    """Wall time of every training batch, from its ``on_train_batch_start`` to its ``on_train_batch_end``.

    Put it last in the trainer's callbacks: its batch end then comes after the other callbacks', so their cost is
    part of the step.

    Attributes:
        times: ``(optimizer step index, seconds)`` of every batch, in order.
    """

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append((trainer.global_step - 1, time.perf_counter() - self._start))

    def after_warmup(self, warmup: int) -> list[tuple[int, float]]:
        """The times without the first ``warmup`` batches (they allocate optimizer state and warm caches)."""
        return self.times[warmup:]


class MLP(pl.LightningModule):
    """``depth`` blocks of ``Linear(width, width)`` + GELU, then an optional ``Linear(width, out_features)`` head.

    The blocks sit in an ``nn.ModuleList``, the units FSDP2Strategy shards by default. Trains on ``(x, y)`` batches
    with mean squared error computed in fp32, with torch AdamW.

    Args:
        width: Input and hidden width.
        depth: Number of blocks.
        out_features: Width of the head; ``None`` for no head (the output is the last block's).
        lr: AdamW's learning rate.
    """

    def __init__(self, width: int, depth: int, out_features: int | None = 1, lr: float = 1e-4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(width, out_features) if out_features is not None else nn.Identity()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def regression_loader(rows: int, width: int, batch_size: int) -> DataLoader:
    """Standard-normal inputs ``(rows, width)`` and targets ``(rows, 1)`` from torch's global generator, in order."""
    return DataLoader(TensorDataset(torch.randn(rows, width), torch.randn(rows, 1)), batch_size=batch_size)


def resident_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the trainable parameters and of the optimizer state this process holds.

    Measured by :func:`lightning_precision.memory.measure_bytes_per_param`, which counts a DTensor's local shard
    per (global) parameter element.

    Returns:
        ``(parameter bytes, optimizer-state bytes)``.
    """
    measured = measure_bytes_per_param(optimizer)
    params = {id(p): p for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    numel = sum(p.numel() for p in params.values())
    return round(measured.params * numel), round(measured.optimizer_state * numel)


@dataclass
class RankRun:
    """A finished multi-process run.

    Attributes:
        seconds: Wall-clock seconds of the whole ``torch.distributed.run`` job.
        results: What each rank wrote with :func:`write_rank_result`, by rank.
    """

    seconds: float
    results: list[dict[str, Any]]


def run_on_ranks(
    script: Path, worker: str, nproc: int, timeout: float = 300, env: dict[str, str] | None = None
) -> RankRun:
    """Run ``script worker OUT_DIR`` on ``nproc`` CPU processes under ``torch.distributed.run`` (gloo).

    Every rank of the script is expected to call :func:`write_rank_result` with ``OUT_DIR``.

    Args:
        script: The benchmark script; it recognises ``worker`` as its first argument.
        worker: The first argument, naming what the ranks run.
        nproc: Number of processes.
        timeout: Seconds before the job is killed (``subprocess.TimeoutExpired``).
        env: Variables added to this process's environment.

    Returns:
        The run.

    Raises:
        SystemExit: If the job fails; the message ends with its stderr.
    """
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        command += [f"--master_port={_free_port()}", str(script), worker, out]
        start = time.perf_counter()
        proc = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{script.name} {worker} on {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
        return RankRun(seconds, [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)])


def write_rank_result(out_dir: str | Path, result: dict[str, Any]) -> None:
    """Write this rank's result (plain data) where :func:`run_on_ranks` reads it."""
    (Path(out_dir) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
