"""Step time with and without UpdateUnderflowMonitor (the cost of a monitored step).

Runs the same small bf16 MLP fit under Lightning without the monitor and with it at ``every_n_steps=2``, so that
within one monitored run every other step is measured: the paired difference between its monitored and unmonitored
steps is the cost of a monitored step, free of the load drift between runs. Runs are interleaved (A, B, A, B, ...);
each run reports median step times (first steps dropped as warm-up) and the table shows the median over runs. The
amortised cost at the default ``every_n_steps=50`` is the monitored-step cost divided by 50.

    python benchmarks/underflow_monitor.py [--repeats 5] [--steps 120] [--width 1024] [--depth 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, without PYTHONPATH

from lightning_precision.callbacks import UpdateUnderflowMonitor


class MLP(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


class StepTimer(pl.Callback):
    """Wall time from batch start to batch end, after every other callback's ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []  # (optimizer step index, seconds)
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((trainer.global_step - 1, time.perf_counter() - self._start))


def run(width: int, depth: int, steps: int, monitor: UpdateUnderflowMonitor | None) -> dict[str, float]:
    """Median step time of the run; with a monitor, separately for its monitored and unmonitored steps."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * 32, width), torch.randn(steps * 32, 1))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*([monitor] if monitor else []), timer],  # timer last: it includes the monitor's batch end
    )
    trainer.fit(MLP(width, depth), DataLoader(data, batch_size=32))
    times = timer.times[10:]  # warm-up
    if monitor is None:
        return {"all": statistics.median(t for _, t in times)}
    return {
        "monitored": statistics.median(t for i, t in times if i % monitor.every_n_steps == 0),
        "unmonitored": statistics.median(t for i, t in times if i % monitor.every_n_steps != 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-elements", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    baseline, monitored, unmonitored, paired = [], [], [], []
    for _ in range(args.repeats):
        baseline.append(run(args.width, args.depth, args.steps, None)["all"])
        m = run(
            args.width, args.depth, args.steps, UpdateUnderflowMonitor(2, max_elements_per_tensor=args.max_elements)
        )
        monitored.append(m["monitored"])
        unmonitored.append(m["unmonitored"])
        paired.append(m["monitored"] - m["unmonitored"])

    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    base = statistics.median(baseline)
    cost = statistics.median(paired)
    print(
        f"bf16-true MLP {args.depth}x{args.width} ({params / 1e6:.1f}M params, {2 * args.depth + 2} tensors), "
        f"torch AdamW, batch 32, {args.threads} thread(s), max_elements_per_tensor={args.max_elements}, "
        f"median of {args.repeats} interleaved runs x {args.steps} steps"
    )
    rows = [
        ("no monitor", base, None),
        ("monitor: unmonitored steps", statistics.median(unmonitored), None),
        ("monitor: monitored steps", statistics.median(monitored), cost),
        ("every_n_steps=50, amortised", base + cost / 50, cost / 50),
    ]
    print(f"{'configuration':30s} {'step ms':>9s} {'overhead ms':>12s} {'overhead':>9s}")
    for name, t, overhead in rows:
        extra = f"{overhead * 1e3:12.2f} {overhead / base:9.1%}" if overhead is not None else f"{'':12s} {'':9s}"
        print(f"{name:30s} {t * 1e3:9.2f} {extra}")
    print("overhead of a monitored step = median over runs of (monitored - unmonitored step) within the same run")


if __name__ == "__main__":
    main()
