"""One optimizer step on CPU: steady and peak bytes per parameter, and step time against torch AdamW fp32 foreach
and fused.

For each model (1M, 8M and 64M parameters in 16 equal tensors; 8M in 5,000 small tensors) and thread count (1 and
all cores), every optimizer row gets:

* **steady B/param**: parameters + gradients + optimizer state after the second step, counted from the tensors
  (:func:`lightning_precision.memory.measure_bytes_per_param`).
* **transient B/param**: growth of the resident set during the second step over the resident set just before it,
  measured in a fresh subprocess per optimizer (two at a time, before the timing): ``/proc/self/clear_refs`` resets
  the peak (``VmHWM``) after ``malloc_trim``, and glibc's ``MALLOC_MMAP_THRESHOLD_`` is set to 64 KiB so that freed
  blocks go back to the system instead of a retained heap that would hide growth. The first step (state creation,
  compilation) is not measured.
* **peak B/param** = steady + transient: what the step needs at its high point.
* **time**: median step time over the interleaved rounds (all optimizers built in one process per thread count,
  started with that many threads, each on its own copy of the model, stepped in turn per round; the first step,
  with state creation and any compile, untimed), and its ratios to torch AdamW fp32 foreach and to torch AdamW fp32
  fused, measured in the same rounds. One process per thread count because a compiled kernel keeps the thread count
  it was compiled under.

Rows that cannot run here are printed with the reason. Usage (from the repository root)::

    python benchmarks/optimizer_step.py            # 1M, 8M, 64M and 8M/5000 tensors; 1 and all threads
    python benchmarks/optimizer_step.py --quick    # 2M parameters, 1 thread, fewer rounds
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from lightning_precision.memory import measure_bytes_per_param
from lightning_precision.optim import CompensatedAdamW

TENSORS = 16
# (label, parameters, tensors)
MODELS = [("1M", 1_000_000, 16), ("8M", 8_000_000, 16), ("64M", 64_000_000, 16), ("8M/5000", 8_000_000, 5000)]
RESULTS = ROOT / "benchmarks" / "results" / "optimizer_step.txt"
BASE_ROW = "torch AdamW fp32 foreach"
FUSED_ROW = "torch AdamW fp32 fused"


@dataclass(frozen=True)
class Row:
    name: str
    dtype: torch.dtype
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    note: str = ""


def _optimi(params):
    import optimi

    # torch's betas and eps, so the arithmetic matches the other rows; Kahan summation on (bf16 parameters).
    return optimi.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, kahan_sum=True)


def _torchao(params):
    from torchao.optim import _AdamW

    return _AdamW(params, lr=1e-3, bf16_stochastic_round=True)


def _flash(params):
    from flashoptim import FlashAdamW

    return FlashAdamW(params, lr=1e-3, quantize=False, master_weight_bits=None, fused=False)


# The 12 B/param layout keeps an fp32 second moment; the default (10 B/param) a bf16 one, rounded stochastically.
SECOND_MOMENT_FP32 = {"exp_avg_sq_dtype": torch.float32}
ROWS = [
    Row(BASE_ROW, torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    Row(FUSED_ROW, torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    Row("torch AdamW bf16 (the trap)", torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    Row("optimi AdamW bf16 Kahan", torch.bfloat16, _optimi),
    Row("torchao _AdamW bf16 stoch. round", torch.bfloat16, _torchao),
    Row(
        "flashoptim FlashAdamW bf16",
        torch.bfloat16,
        _flash,
        "quantize=False, master_weight_bits=None, fused=False (the CPU settings): no master copy, the trap",
    ),
    Row(
        "CompensatedAdamW 12 B (eager)",
        torch.bfloat16,
        lambda ps: CompensatedAdamW(ps, lr=1e-3, implementation="chunked", **SECOND_MOMENT_FP32),
        "exp_avg_sq fp32; implementation='chunked': eager ops over bounded chunks",
    ),
    Row(
        "CompensatedAdamW 12 B (compiled)",
        torch.bfloat16,
        lambda ps: CompensatedAdamW(ps, lr=1e-3, implementation="compiled", **SECOND_MOMENT_FP32),
        "exp_avg_sq fp32; implementation='compiled' (the default 'auto' from 2**20 elements)",
    ),
    Row(
        "CompensatedAdamW 10 B (eager)",
        torch.bfloat16,
        lambda ps: CompensatedAdamW(ps, lr=1e-3, implementation="chunked"),
        "the default layout: exp_avg_sq bf16, stochastic rounding",
    ),
    Row(
        "CompensatedAdamW 10 B (compiled)",
        torch.bfloat16,
        lambda ps: CompensatedAdamW(ps, lr=1e-3, implementation="compiled"),
        "the default layout: exp_avg_sq bf16, stochastic rounding",
    ),
    Row(
        "CompensatedAdamW 10 B (reference)",
        torch.bfloat16,
        lambda ps: CompensatedAdamW(ps, lr=1e-3, implementation="reference"),
        "implementation='reference': whole-tensor ops (not in the default table: its peak is the point)",
    ),
]
ROW_BY_NAME = {row.name: row for row in ROWS}


def _model(numel: int, tensors: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(tensors):
        # Generated in the storage dtype: an fp32 temporary would raise the resident set before it is measured.
        p = torch.nn.Parameter(torch.randn(numel // tensors, generator=g, dtype=dtype))
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype).mul_(1e-2)
        params.append(p)
    return params


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:110]


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def probe(name: str, numel: int, tensors: int, threads: int) -> dict:
    """In this (fresh) process: steady and transient bytes per parameter of the second step of one optimizer."""
    torch.set_num_threads(threads)
    torch.ones(1 << 20).mul_(2.0)  # start the thread pool before anything is measured
    row = ROW_BY_NAME[name]
    try:
        params = _model(numel, tensors, row.dtype, seed=0)
        opt = row.build(params)
        opt.step()
    except Exception as exc:  # the row reports why it does not run
        return {"error": _reason(exc)}
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set (VmHWM) := current resident set
    before = _kib("VmRSS")
    opt.step()
    transient = (_kib("VmHWM") - before) * 1024 / numel
    return {"steady": measure_bytes_per_param(opt).total, "transient": transient}


def _run_probe(name: str, numel: int, tensors: int, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--probe", name, "--numel", str(numel), "--tensors", str(tensors)]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"probe exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def time_steps(
    numel: int, tensors: int, threads: list[int], rounds: int, rows: list[Row]
) -> dict[tuple[str, int], float | str]:
    """Median step seconds per (row, threads), optimizers interleaved round by round; a str is why a row failed.

    Compiled kernels are built for the thread count of their first step (inductor's CPU code fixes its OpenMP team
    then): :func:`_run_timing` calls this in a fresh process per thread count."""
    opts: dict[str, torch.optim.Optimizer] = {}
    result: dict[tuple[str, int], float | str] = {}
    for row in rows:
        try:
            opt = row.build(_model(numel, tensors, row.dtype, seed=0))
            opt.step()  # state creation and any compilation stay out of the timing
            opts[row.name] = opt
        except Exception as exc:
            for t in threads:
                result[(row.name, t)] = _reason(exc)
    for t in threads:
        torch.set_num_threads(t)
        samples: dict[str, list[float]] = {name: [] for name in opts}
        for r in range(rounds + 1):  # round 0 warms up each optimizer at this thread count
            for name, opt in opts.items():
                start = time.perf_counter()
                opt.step()
                if r:
                    samples[name].append(time.perf_counter() - start)
        for name, s in samples.items():
            result[(name, t)] = statistics.median(s)
    return result


def _run_timing(numel: int, tensors: int, threads: int, rounds: int, rows: list[Row]) -> dict:
    """:func:`time_steps` for one thread count, in a fresh process started with that many threads (a kernel
    compiled for 2 threads and run on 1 took 2.6x as long as one compiled for 1 here)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--timing", "--numel", str(numel), "--tensors", str(tensors)]
    cmd += ["--threads", str(threads), "--rounds", str(rounds), "--rows", *(row.name for row in rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        error = f"timing process exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"
        return {(row.name, threads): error for row in rows}
    return {(name, threads): value for name, value in json.loads(lines[-1]).items()}


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2M parameters, 1 thread, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per thread count (default 7; quick 3)")
    parser.add_argument("--out", type=Path, default=None, help=f"also write the output here (default {RESULTS})")
    parser.add_argument(
        "--rows",
        nargs="*",
        default=None,
        choices=[row.name for row in ROWS],
        help="only these optimizers (and the base)",
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=None, help="only these models, by label (e.g. 8M 8M/5000)")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.numel, args.tensors, args.threads)))
        return
    if args.timing:
        torch.set_num_threads(args.threads)
        chosen = [row for row in ROWS if row.name in args.rows]
        timed = time_steps(args.numel, args.tensors, [args.threads], args.rounds, chosen)
        print(json.dumps({name: value for (name, _), value in timed.items()}))
        return

    default_rows = [row.name for row in ROWS if "(reference)" not in row.name]
    rows = [row for row in ROWS if row.name in (args.rows or default_rows) or row.name == BASE_ROW]
    models = [("2M", 2_000_000, TENSORS)] if args.quick else MODELS
    if args.models:
        models = [m for m in MODELS if m[0] in args.models]
    threads = [1] if args.quick else sorted({1, os.cpu_count() or 1})
    rounds = args.rounds or (3 if args.quick else 7)
    out_path = args.out or (None if args.quick else RESULTS)
    command = "python benchmarks/optimizer_step.py" + (" --quick" if args.quick else "")
    if args.rounds:
        command += f" --rounds {args.rounds}"
    if args.rows:
        command += " --rows " + " ".join(f'"{name}"' for name in args.rows)
        out_path = args.out  # a subset never overwrites the full table
    if args.models:
        command += " --models " + " ".join(args.models)
        out_path = args.out
    lines = [
        f"# Output of: {command}",
        f"# {datetime.date.today()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; 1-minute load average {_load()} at the start; shared machine",
        f"# time = median of {rounds} interleaved rounds; "
        "peak = steady + transient (transient: resident-set growth in the 2nd step, fresh subprocess per optimizer)",
        "",
    ]
    print("\n".join(lines), flush=True)
    started = time.monotonic()
    header = (
        f"{'model':>7} {'thr':>3}  {'optimizer':<34} {'steady':>7} {'transient':>9} {'peak':>7}"
        f"  {'ms/step':>8} {'vs foreach':>10} {'vs fused':>8}  note"
    )
    for label_model, numel, tensors in models:
        # Two probes at a time (one per core): each measures only its own resident set. The timing runs after them,
        # with no probe competing for the cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            probes = {
                (row.name, t): pool.submit(_run_probe, row.name, numel, tensors, t) for t in threads for row in rows
            }
            memory = {key: future.result() for key, future in probes.items()}
        timing = {key: value for t in threads for key, value in _run_timing(numel, tensors, t, rounds, rows).items()}
        for t in threads:
            block = [header, "-" * len(header)]
            base, fused = timing.get((BASE_ROW, t)), timing.get((FUSED_ROW, t))
            for row in rows:
                mem = memory[(row.name, t)]
                secs = timing[(row.name, t)]
                label = f"{label_model:>7} {t:>3}  {row.name:<34}"
                error = mem.get("error") or (secs if isinstance(secs, str) else None)
                if error:
                    block.append(f"{label} does not run here: {error}")
                    continue
                ratio = secs / base if isinstance(base, float) else float("nan")
                ratio_fused = secs / fused if isinstance(fused, float) else float("nan")
                block.append(
                    f"{label} {mem['steady']:7.2f} {mem['transient']:9.2f} {mem['steady'] + mem['transient']:7.2f}"
                    f"  {secs * 1e3:8.1f} {ratio:9.2f}x {ratio_fused:7.2f}x  {row.note}"
                )
            text = "\n".join(block) + "\n"
            print(text, flush=True)
            lines.append(text)
    tail = f"# took {time.monotonic() - started:.0f} s; 1-minute load average {_load()} at the end"
    print(tail)
    lines.append(tail)
    if out_path:
        out_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
