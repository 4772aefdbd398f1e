"""Where a CompensatedAdamW step over many small tensors spends its time, part by part, on CPU.

Builds the model of ``optimizer_step.py`` (``--numel`` parameters in ``--tensors`` equal 1-D bf16 tensors), takes two
steps (state creation, compile), then times the whole step and the per-tensor bookkeeping parts it runs on the host
each step, alone: collecting the tensors (``_buckets.collect``), the stochastic rounding's streams
(``state_rounding``) and the finite check. Median of ``--repeats`` calls each. Usage (from the repository root)::

    python benchmarks/step_parts.py                      # 8M parameters in 5,000 tensors, default layout, 1 thread
    python benchmarks/step_parts.py --layout 12          # the fp32 second moment (no streams)
    python benchmarks/step_parts.py --tensors 16 --threads 2 --switch-to 1   # a thread count changed after compiling
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from optimizer_step import _model

from lightning_precision.optim import CompensatedAdamW, _nonfinite
from lightning_precision.optim._reference_step import state_rounding


def _median_ms(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=8_000_000)
    parser.add_argument("--tensors", type=int, default=5000)
    parser.add_argument("--layout", choices=["10", "12"], default="10", help="B/param: 10 (default) or 12")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--switch-to", type=int, help="thread count set after the two first steps (compile, state)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = _model(args.numel, args.tensors, torch.bfloat16, seed=0)
    second_moment = {"exp_avg_sq_dtype": torch.float32} if args.layout == "12" else {}
    opt = CompensatedAdamW(params, lr=1e-3, weight_decay=0.01, **second_moment)
    opt.step()
    opt.step()
    if args.switch_to is not None:
        torch.set_num_threads(args.switch_to)  # the next step recompiles: dynamo guards torch's thread count
        opt.step()
    (group, _, bucket), *_ = opt._buckets()[0]
    owners, counts = bucket[6], [float(s) for s in bucket[4]]
    parts = {
        "whole step": opt.step,
        "collect the tensors": opt._buckets,
        "rounding streams": lambda: state_rounding(opt.param_groups, group, owners, counts),
        "finite check": lambda: _nonfinite.finite_flags(bucket[1], None).tolist(),
    }
    print(
        f"# {args.numel:,} parameters in {args.tensors:,} tensors, {args.layout} B/param, {args.threads} thread(s)"
        f"{'' if args.switch_to is None else f' then {args.switch_to}'}, "
        f"torch {torch.__version__}; median of {args.repeats} calls"
    )
    for name, function in parts.items():
        print(f"{name:>22}  {_median_ms(function, args.repeats):8.1f} ms")


if __name__ == "__main__":
    main()
