"""Convergence of the precision recipes on the built-in teacher task, against an fp32 reference, over several seeds.

Every recipe trains the same student from the same initial weights on the same data in the same order with the
task's cosine schedule; only the precision (and the optimizer) differ. Recipes:

* ``32-true``               fp32 reference (torch AdamW)
* ``bf16-mixed``            fp32 weights, bf16 autocast (torch AdamW)
* ``bf16-true+adamw``       bf16 weights, torch AdamW: the trap
* ``bf16-true+compensated`` bf16 weights, lightning_precision.optim.CompensatedAdamW
* ``fsdp2-bf16-mixed x2``   FSDP2Strategy (fp32 storage, bf16 compute, fp32 reduce) on 2 processes (gloo), the same
  global batch of 128 split 64/64 over the ranks, the same data order (see "data order" below)

The single-process recipes run through :func:`lightning_precision.cli.compare.run_recipe` (the library's own path,
exactly what ``lightning-precision compare`` does). Final loss = mean of the last ``--last-k`` step losses; the table
gives its mean over seeds and the ratio of that mean to the reference's mean (and the per-seed ratio range).

"Separate": for each seed, the first step after which the trap's moving-average loss (trailing window of
``steps // 50``) stays more than 5% above the reference's moving average until the end of the run.

Usage (from the repository root)::

    python benchmarks/convergence.py --steps 3000 --seeds 3 --threads 1
    # the second-moment comparison (fp32 vs bf16 nearest vs bf16 stochastic rounding), no FSDP2, no plot:
    python benchmarks/convergence.py --no-fsdp2 --plot none --recipes 32-true bf16-true+compensated \
        "compensated v=bf16 nearest" "compensated v=bf16 stochastic"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness
import torch
from torch.utils.data import DataLoader

from lightning_precision.cli.compare import (
    COMPENSATED_OPTIMIZER,
    RECIPES,
    Recipe,
    quiet_lightning,
    recipe_config,
    run_recipe,
)
from lightning_precision.cli.plot import moving_average
from lightning_precision.demos import TensorDictDataset, make_dataloader, make_teacher_data

SINGLE = ("32-true", "bf16-mixed", "bf16-true+adamw", "bf16-true+compensated")
# CompensatedAdamW's second moment in fp32, or in bf16 rounded to nearest or stochastically (the default, as
# "bf16-true+compensated"): the three-way comparison behind the exp_avg_sq defaults. Select with --recipes.
SECOND_MOMENT = {
    r.name: r
    for r in (
        Recipe(
            "compensated v=fp32",
            "bf16-true",
            {"_target_": COMPENSATED_OPTIMIZER, "weight_decay": 0.0, "exp_avg_sq_dtype": "float32"},
        ),
        Recipe(
            "compensated v=bf16 nearest",
            "bf16-true",
            {
                "_target_": COMPENSATED_OPTIMIZER,
                "weight_decay": 0.0,
                "exp_avg_sq_dtype": "bfloat16",
                "exp_avg_sq_rounding": "nearest",
            },
        ),
        Recipe(
            "compensated v=bf16 stochastic",
            "bf16-true",
            {
                "_target_": COMPENSATED_OPTIMIZER,
                "weight_decay": 0.0,
                "exp_avg_sq_dtype": "bfloat16",
                "exp_avg_sq_rounding": "stochastic",
            },
        ),
    )
}
FSDP2 = "fsdp2-bf16-mixed x2"
FSDP2_WORKER = "fsdp2"  # first argument of this script when torch.distributed.run starts it as a rank
TRAP = "bf16-true+adamw"
SEPARATION = 1.05
WORLD = 2


# ---------------------------------------------------------------------------------------------------------------
# Data order under 2 ranks
# ---------------------------------------------------------------------------------------------------------------
class RankSlice:
    """Batch sampler that yields this rank's half of every global batch of a single-process batch sampler.

    Every rank iterates the same seeded global order; rank ``r`` takes rows ``r::world`` of each global batch, so
    the ranks together see exactly the single-process batches, and the mean of the per-rank mean losses (and
    gradients, as FSDP averages them) is the single-process global-batch mean.
    """

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches)


def rank_loader(data: dict[str, torch.Tensor], batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """The task's own shuffled loader (same seed, same order), split by rank inside each global batch."""
    single = make_dataloader(data, batch_size=batch_size, shuffle=True, seed=seed)
    return DataLoader(
        TensorDictDataset(data), sampler=RankSlice(single.sampler, rank, world), batch_size=None, num_workers=0
    )


def default_distributed_order(seed: int = 0, batches: int = 4) -> list[str]:
    """What Lightning's default ``use_distributed_sampler=True`` does to the task's loader on 2 ranks."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    data = make_teacher_data(seed=seed)
    single = make_dataloader(data, batch_size=128, shuffle=True, seed=seed)
    reference = [list(b) for b in single.sampler][: 2 * batches]
    lines = [f"single process: {len(single.sampler)} batches/epoch of 128 rows"]
    for rank in range(WORLD):
        loader = make_dataloader(data, batch_size=128, shuffle=True, seed=seed)
        sampler = _get_distributed_sampler(
            loader, _is_dataloader_shuffled(loader), overfit_batches=0, num_replicas=WORLD, rank=rank
        )
        sampler.set_epoch(0)
        got = list(sampler)
        where = [reference.index(list(b)) if list(b) in reference else None for b in got[:batches]]
        lines.append(
            f"Lightning default, rank {rank}: {type(sampler).__name__}, {len(got)} batches/epoch of {len(got[0])} rows; "
            f"its first batches are single-process batches {where}"
        )
    for rank in range(WORLD):
        mine = list(RankSlice(single.sampler, rank, WORLD))
        lines.append(f"this benchmark, rank {rank}: {len(mine)} batches/epoch of {len(mine[0])} rows (rows {rank}::2)")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The 2-rank FSDP2 run (worker side, under torch.distributed.run)
# ---------------------------------------------------------------------------------------------------------------
def fsdp2_worker(out: Path) -> None:
    import lightning.pytorch as pl

    from lightning_precision.cli.train import apply_storage_dtype, build_task
    from lightning_precision.config import resolve_trainer_cfg
    from lightning_precision.dtypes import dtype_name

    steps, seed = int(os.environ["CONV_STEPS"]), int(os.environ["CONV_SEED"])
    torch.set_num_threads(int(os.environ["CONV_THREADS"]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = recipe_config(RECIPES["bf16-mixed"], steps, seed)
    cfg["trainer"].update(devices=world, strategy={"name": "fsdp2"}, use_distributed_sampler=False)
    with quiet_lightning():
        kwargs = resolve_trainer_cfg(cfg["trainer"], model=cfg["model"], optimizer=cfg["optimizer"])
        pl.seed_everything(seed, verbose=False)
        module, data = build_task(cfg["model"], cfg["optimizer"], cfg["data"], seed)
        apply_storage_dtype(module, kwargs)
        data.setup()
        loader = rank_loader(data.data, data.hparams.batch_size, data.hparams.shuffle_seed, rank, world)
        trainer = pl.Trainer(**dict(kwargs))
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
    param = next(module.parameters())
    local = getattr(param, "_local_tensor", param)
    optimizer = trainer.optimizers[0]
    state = optimizer.state[param]
    harness.write_rank_result(
        out,
        {
            "losses": module.step_losses,
            "seconds": seconds,
            "storage": dtype_name(local.dtype),
            "state": dtype_name(getattr(state["exp_avg"], "_local_tensor", state["exp_avg"]).dtype),
            "strategy": type(trainer.strategy).__name__,
        },
    )


def run_fsdp2(steps: int, seed: int, threads: int) -> dict[str, Any]:
    env = {"CONV_STEPS": str(steps), "CONV_SEED": str(seed), "CONV_THREADS": str(threads)}
    job = harness.run_on_ranks(Path(__file__), FSDP2_WORKER, WORLD, timeout=3600, env=env)
    ranks = job.results
    # Equal local batch sizes: the global-batch loss is the mean of the ranks' losses.
    losses = [sum(vals) / WORLD for vals in zip(*(r["losses"] for r in ranks))]
    return {"losses": losses, "seconds": job.seconds, "storage": ranks[0]["storage"], "state": ranks[0]["state"]}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def separation_step(trap: list[float], ref: list[float], threshold: float = SEPARATION) -> int | None:
    """First step after which ``smooth(trap) > threshold * smooth(ref)`` holds until the end (``None``: never)."""
    a, b = moving_average(trap), moving_average(ref)
    step = None
    for i in range(len(a) - 1, -1, -1):
        if a[i] > threshold * b[i]:
            step = i
        else:
            break
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--last-k", type=int, default=100, help="final loss = mean of the last K step losses")
    parser.add_argument("--no-fsdp2", action="store_true", help="skip the 2-process FSDP2 run")
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=list(SINGLE),
        choices=list(SINGLE) + list(SECOND_MOMENT),
        help="single-process recipes (32-true, the reference, always runs)",
    )
    parser.add_argument(
        "--plot", type=str, default=str(harness.ROOT / "docs/img/convergence.png"), help="PNG path, or 'none'"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every loss curve to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    print("data order (seed 0):")
    for line in default_distributed_order():
        print("  " + line)

    single = ["32-true"] + [n for n in args.recipes if n != "32-true"]
    recipes = {**RECIPES, **SECOND_MOMENT}
    names = single + ([] if args.no_fsdp2 else [FSDP2])
    runs: dict[str, list[list[float]]] = {n: [] for n in names}
    info: dict[str, dict[str, Any]] = {n: {"seconds": 0.0} for n in names}
    for seed in range(args.seeds):
        with quiet_lightning():
            for name in single:
                t0 = time.perf_counter()
                result = run_recipe(recipes[name], args.steps, seed)
                if result.status != "ok":
                    raise SystemExit(f"{name} seed {seed}: {result.status}: {result.reason}")
                runs[name].append(result.losses)
                info[name].update(storage=result.storage_dtype, optimizer=result.optimizer, state=result.state_dtype)
                info[name]["seconds"] += time.perf_counter() - t0
                print(
                    f"seed {seed} {name}: final {_final(result.losses, args.last_k):.4e}", file=sys.stderr, flush=True
                )
        if not args.no_fsdp2:
            res = run_fsdp2(args.steps, seed, args.threads)
            runs[FSDP2].append(res["losses"])
            info[FSDP2].update(storage=res["storage"], optimizer="torch.AdamW", state=res["state"])
            info[FSDP2]["seconds"] += res["seconds"]
            print(f"seed {seed} {FSDP2}: final {_final(res['losses'], args.last_k):.4e}", file=sys.stderr, flush=True)

    ref_finals = [_final(l, args.last_k) for l in runs["32-true"]]
    ref_mean = statistics.mean(ref_finals)
    print(
        f"\nbuilt-in teacher task, {args.steps} steps, seeds 0..{args.seeds - 1}, {args.threads} thread(s)/process; "
        f"final loss = mean of the last {args.last_k} steps"
    )
    width = max(24, *(len(n) for n in names))
    head = f"{'recipe':<{width}} {'storage':<9} {'optimizer':<36} {'state':<17} {'final (mean)':>12} {'ratio':>7} {'per-seed ratio':>15} {'s/seed':>7}"
    print(head)
    print("-" * len(head))
    table = []
    for name in names:
        finals = [_final(l, args.last_k) for l in runs[name]]
        per_seed = [f / r for f, r in zip(finals, ref_finals)]
        mean = statistics.mean(finals)
        row = {
            "recipe": name,
            "storage": info[name].get("storage", "-"),
            "optimizer": info[name].get("optimizer", "-"),
            "state": info[name].get("state", "-"),
            "finals": finals,
            "final_mean": mean,
            "ratio": mean / ref_mean,
            "per_seed_ratio": [min(per_seed), max(per_seed)],
            "seconds_per_seed": info[name]["seconds"] / args.seeds,
        }
        table.append(row)
        print(
            f"{name:<{width}} {row['storage']:<9} {row['optimizer']:<36} {row['state']:<17} {mean:>12.4e} "
            f"{row['ratio']:>6.3f}x {min(per_seed):>7.3f}-{max(per_seed):<7.3f} {row['seconds_per_seed']:>7.1f}"
        )
    seps: list[int | None] = []
    if TRAP in names:
        seps = [separation_step(t, r) for t, r in zip(runs[TRAP], runs["32-true"])]
        print(
            f"\n{TRAP} separates from 32-true (moving average, window {max(1, args.steps // 50)}, stays > "
            f"{SEPARATION:.2f}x until the end) at step: " + ", ".join(f"seed {s}: {v}" for s, v in enumerate(seps))
        )
        trap, ref = mean_smoothed(runs[TRAP]), mean_smoothed(runs["32-true"])
        marks = sorted({min(args.steps, m) for m in (250, 500, 1000, 1500, 2000, 3000, args.steps)})
        print(
            f"{TRAP} / 32-true moving-average loss (mean of seeds) at step: "
            + ", ".join(f"{m}: {trap[m - 1] / ref[m - 1]:.2f}x" for m in marks)
        )
    if args.plot != "none":
        args.plot = Path(args.plot)
        plot(runs, names, seps, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table, "runs": runs}, indent=1)
        )
    root = harness.ROOT
    if args.plot != "none":
        print(f"plot: {args.plot.relative_to(root) if args.plot.is_relative_to(root) else args.plot}")
    print(f"total {time.perf_counter() - start:.0f} s")


def _final(losses: list[float], k: int) -> float:
    tail = losses[-k:]
    return sum(tail) / len(tail)


def plot(
    runs: dict[str, list[list[float]]], names: list[str], seps: list[int | None], args: argparse.Namespace
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(9, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    styles = {
        "32-true": ("black", "-"),
        "bf16-mixed": ("tab:blue", "--"),
        "bf16-true+adamw": ("tab:red", "-"),
        "bf16-true+compensated": ("tab:green", "-."),
        FSDP2: ("tab:purple", ":"),
        "compensated v=bf16 nearest": ("tab:orange", "-"),
        "compensated v=bf16 stochastic": ("tab:olive", "--"),
    }
    curves = {n: mean_smoothed(runs[n]) for n in names}
    ref = curves["32-true"]
    for name in names:
        color, ls = styles[name]
        top.plot(curves[name], color=color, linestyle=ls, linewidth=1.6, label=name)
        ratio = [c / r for c, r in zip(curves[name], ref)]
        if name == TRAP:
            middle.plot(ratio, color=color, linestyle=ls, linewidth=1.6, label=f"{name} / 32-true")
        elif name != "32-true":
            bottom.plot(ratio, color=color, linestyle=ls, linewidth=1.4, label=f"{name} / 32-true")
    top.set_yscale("log")
    top.set_ylabel(f"training loss\n(moving avg, mean of {args.seeds} seeds)")
    top.set_title(f"Built-in teacher task, {args.steps} steps, cosine lr: same data, same init, different precision")
    top.legend(fontsize=9)
    found = [s for s in seps if s is not None]
    if found:
        middle.axvspan(min(found), max(found) + 1, color="tab:red", alpha=0.2, label=f"separation, seeds: {found}")
    middle.axhline(SEPARATION, color="grey", linestyle=":", linewidth=1, label=f"{SEPARATION:.2f}x")
    middle.set_yscale("log")
    middle.set_ylabel("trap loss / fp32 loss")
    middle.legend(fontsize=9, loc="upper left")
    for band in (0.99, 1.01):
        bottom.axhline(band, color="grey", linestyle=":", linewidth=1)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    safe = [c / r for n in names if n not in (TRAP, "32-true") for c, r in zip(curves[n], ref)]
    bottom.set_ylim(0.97, max(1.05, min(2.6, 1.02 * max(safe, default=1.0))))
    bottom.set_ylabel("safe recipes: loss / fp32 loss\n(dotted: +-1%)")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8, loc="upper right")
    for ax in (top, middle, bottom):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)


def mean_smoothed(runs: list[list[float]]) -> list[float]:
    """Moving average of each seed's curve, then the mean over seeds."""
    return [statistics.mean(v) for v in zip(*(moving_average(losses) for losses in runs))]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == FSDP2_WORKER:
        fsdp2_worker(Path(sys.argv[2]))
    else:
        main()
