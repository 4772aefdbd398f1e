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
import warnings

import harness
import torch

from lightning_precision.callbacks import UpdateUnderflowMonitor

LR = 1e-5
WARMUP_STEPS = 10


def run(width: int, depth: int, steps: int, monitor: UpdateUnderflowMonitor | None) -> dict[str, float]:
    """Median step time of the run; with a monitor, separately for its monitored and unmonitored steps."""
    torch.manual_seed(0)
    loader = harness.regression_loader(steps * 32, width, batch_size=32)
    timer = harness.StepTimer()
    trainer = harness.trainer(
        devices=1,
        precision="bf16-true",
        max_steps=steps,
        callbacks=[*([monitor] if monitor else []), timer],  # timer last: it includes the monitor's batch end
    )
    trainer.fit(harness.MLP(width, depth, lr=LR), loader)
    times = timer.after_warmup(WARMUP_STEPS)
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

    params = sum(p.numel() for p in harness.MLP(args.width, args.depth).parameters())
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
