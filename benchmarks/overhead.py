"""Overhead of this library's plugins against Lightning's own plugin for the same precision, and of input casting.

Prints two tables:
1. seconds per training step of each plugin pair and the ratio; target <= 1.03x. Each repeat fits both sides once
   (order alternating between repeats, so load drift and warm-up order hit both alike) and gives one paired ratio
   ours/theirs of the runs' median step times; the table shows the median of those ratios and their min-max
   spread. An A/A row (Lightning's plugin against itself) measures the noise floor: a ratio inside the A/A spread
   is not distinguishable from 1.
2. time to cast one large nested batch (thousands of tensors) with ``cast_batch`` against Lightning's
   ``apply_to_collection`` doing the plain cast (which cannot preserve audio keys).

Usage: python benchmarks/overhead.py [--repeats 11] [--steps 100] [--tensors 4000] [--threads 1]
Check ``uptime`` first: on a shared machine the spread, not the median, tells whether the ratio means anything.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import harness
import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from lightning_utilities import apply_to_collection
from torch.utils.data import DataLoader, TensorDataset

from lightning_precision import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio
from lightning_precision.casting import cast_batch

WARMUP_STEPS = 10


class AudioBatchMLP(harness.MLP):
    """The harness MLP (4 blocks of 512, no head) on dict batches whose ``audio`` tensor input casting keeps."""

    def __init__(self) -> None:
        super().__init__(width=512, depth=4, out_features=None)

    def training_step(self, batch, batch_idx):
        x = batch["x"] + batch["audio"].to(batch["x"].dtype)
        return self(x).float().pow(2).mean()


def _loader(steps: int, width: int = 512, batch: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, audio = torch.randn(steps * batch, width, generator=g), torch.randn(steps * batch, width, generator=g)

    def collate(rows):
        xs, auds = zip(*rows)
        return {"x": torch.stack(xs), "audio": torch.stack(auds)}

    return DataLoader(TensorDataset(x, audio), batch_size=batch, collate_fn=collate)


def median_step_seconds(plugin_factory, steps: int) -> float:
    torch.manual_seed(0)
    timer = harness.StepTimer()
    trainer = harness.trainer(max_steps=steps, plugins=[plugin_factory()], callbacks=[timer])
    trainer.fit(AudioBatchMLP(), _loader(steps))
    return statistics.median(t for _, t in timer.after_warmup(WARMUP_STEPS))


PAIRS = {
    "bf16-true": (lambda: HalfPrecisionForAudio("bf16-true", on_unsafe="ignore"), lambda: HalfPrecision("bf16-true")),
    "bf16-mixed": (
        lambda: CheckedMixedPrecision("bf16-mixed", device="cpu"),
        lambda: MixedPrecision("bf16-mixed", device="cpu"),
    ),
    "bf16-flash vs bf16-true": (
        lambda: FlashPrecision("bf16-flash", on_unsafe="ignore"),
        lambda: HalfPrecision("bf16-true"),
    ),
    "A/A: lightning bf16-mixed": (
        lambda: MixedPrecision("bf16-mixed", device="cpu"),
        lambda: MixedPrecision("bf16-mixed", device="cpu"),
    ),
}


def nested_batch(n_tensors: int) -> dict:
    g = torch.Generator().manual_seed(0)
    per = max(1, n_tensors // 40)
    return {
        f"utt{i}": {
            "audio_signal": [torch.randn(16, generator=g) for _ in range(per // 2)],
            "feats": [torch.randn(16, generator=g) for _ in range(per - per // 2)],
            "ids": torch.arange(8),
        }
        for i in range(40)
    }


def time_call(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tensors", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_precision").setLevel(logging.ERROR)

    print(
        f"Step time, {args.repeats} paired repeats x {args.steps} steps (MLP 4x512, batch 64, CPU, "
        f"{args.threads} thread(s)); ratio = median of per-repeat ours/lightning, spread = min-max of those"
    )
    print(f"{'precision':<26}{'ours ms/step':>13}{'lightning ms/step':>19}{'ratio':>8}{'spread':>15}")
    for name, (ours, theirs) in PAIRS.items():
        ours_t, theirs_t = [], []
        for i in range(args.repeats):  # interleaved, order alternating, so drift hits both sides alike
            if i % 2:
                theirs_t.append(median_step_seconds(theirs, args.steps))
                ours_t.append(median_step_seconds(ours, args.steps))
            else:
                ours_t.append(median_step_seconds(ours, args.steps))
                theirs_t.append(median_step_seconds(theirs, args.steps))
        ratios = [a / b for a, b in zip(ours_t, theirs_t)]
        a, b = statistics.median(ours_t), statistics.median(theirs_t)
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        print(f"{name:<26}{a * 1e3:>13.3f}{b * 1e3:>19.3f}{statistics.median(ratios):>8.3f}{spread:>15}", flush=True)

    batch = nested_batch(args.tensors)
    n = sum(len(v["audio_signal"]) + len(v["feats"]) + 1 for v in batch.values())
    ours = time_call(lambda: cast_batch(batch, torch.bfloat16), args.repeats * 4)
    plain = time_call(
        lambda: apply_to_collection(batch, torch.Tensor, _convert_fp_tensor, dst_type=torch.bfloat16), args.repeats * 4
    )
    print(f"\nInput casting of one nested batch with {n} tensors (median of {args.repeats * 4})")
    print(f"{'cast_batch (keeps audio)':<34}{ours * 1e3:>10.2f} ms")
    print(f"{'apply_to_collection (plain cast)':<34}{plain * 1e3:>10.2f} ms")
    print(f"{'ratio':<34}{ours / plain:>10.2f} x")


if __name__ == "__main__":
    main()
