"""Resident memory over repeated fits of one LightningModule in one process (issue 23: re-fits and leaks).

Each fit builds a fresh Trainer, a fresh ``HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32")``
(the pairing ``CompensatedAdamW``) and a fresh data set (``--data-mb``) around the same module, then drops them. A
plugin that leaves its gradient hooks on the parameters keeps every earlier Trainer (and its data) alive through
them, and their hooks take the gradients of later fits: RSS climbs with every fit, and later fits leave the
parameters unchanged. Prints, per fit: RSS after a full garbage collection, the growth since the previous fit, the
post-accumulate-grad hooks on the parameters and whether the fit changed any parameter.

Usage:
    python benchmarks/refit_memory.py --fits 50 --steps 4 --width 512 --data-mb 8
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_precision.optim import CompensatedAdamW
from lightning_precision.plugins import HalfPrecisionForAudio

_FEATURES = 256


class _Regression(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(_FEATURES, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return CompensatedAdamW(self.parameters(), lr=1e-3)


def rss_mb() -> float:
    """Resident set size of this process (Linux ``/proc``), in MB."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hooks_on(module: nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per fit")
    parser.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    parser.add_argument("--width", type=int, default=512, help="hidden width (parameters ~ width**2)")
    parser.add_argument("--data-mb", type=float, default=8.0, help="size of each fit's data set")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning_precision"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = max(64, int(args.data_mb * 2**20 / (4 * (_FEATURES + 1))))
    module = _Regression(args.width)
    params = sum(p.numel() for p in module.parameters())
    print(f"{params} parameters, {args.steps} steps x {args.accumulate} micro-batches per fit, {args.fits} fits")
    print(f"{'fit':>4} {'rss_mb':>9} {'delta_mb':>9} {'hooks':>6} {'trained':>8}")
    previous = rss_mb()
    start = time.perf_counter()
    for fit in range(1, args.fits + 1):
        before = [p.detach().clone() for p in module.parameters()]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            accumulate_grad_batches=args.accumulate,
            plugins=[HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32")],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = TensorDataset(torch.randn(rows, _FEATURES), torch.randn(rows, 1))
        trainer.fit(module, DataLoader(data, batch_size=8))
        trained = any(bool((p != b).any()) for p, b in zip(module.parameters(), before))
        del trainer, before, data
        gc.collect()
        now = rss_mb()
        print(f"{fit:>4} {now:>9.1f} {now - previous:>+9.1f} {hooks_on(module):>6} {str(trained):>8}")
        previous = now
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
