"""Held-out loss of a small Llama-style language model on real text under each precision recipe, against fp32.

Model: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (:data:`MODEL`), random init from ``--seed``, the same
initial weights for every recipe. Data: :mod:`lightning_precision.demos.stdlib_text`, byte-level tokens of a fixed
list of the Python standard library's own sources, split by file; the held-out files are never trained on. Every
recipe sees the same windows in the same order (``--accumulate-grad-batches N`` splits each optimizer step's windows
into N micro-batches, so the tokens per optimizer step do not change). Schedule: linear warmup, cosine decay to 10%
of the peak lr (:func:`lightning_precision.demos.cosine_lr_lambda`). AdamW settings are shared by every recipe:
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, 0 on norms.

Peak lr 3e-4 (``--lr``). Adam's update is about lr in size, and half a bf16 ulp of a weight at the init scale (0.02)
is 6e-5. Late in the decay (3e-5 at the end) the updates are smaller than that: this is the regime of long runs and
fine-tunes where the trap was reported. At 2e-3 they stay above it for 300 steps and the trap does not separate
(``benchmarks/results/lm_convergence_lr2e-3.txt``, the earlier default).

Held-out loss: mean next-byte cross entropy (nats per byte) of fixed windows of the held-out files, computed in fp32
(an fp32 copy of the current parameters, autocast off), every ``--eval-every`` steps and at the end.

Recipes (:data:`RECIPES`; adding one is one :func:`register` call): see ``--list``. Single-process recipes run in
their own subprocess with one torch thread, two at a time; the FSDP2 recipe runs on 2 CPU ranks
(``torch.distributed.run``, gloo), each rank taking half the rows of every micro-batch, and takes both cores.

Peak memory: each process resets its peak resident set (``/proc/self/clear_refs``) at the start of every training
batch and reads ``VmHWM`` at its end (after the optimizer step, so the step's temporaries are inside), before the
held-out evaluation; the table gives the maximum over batches, and that peak minus the resident set just before
``fit`` (interpreter, torch, corpus and the fp32 model already loaded). glibc's ``MALLOC_MMAP_THRESHOLD_`` is set to
64 KiB so freed blocks leave the resident set. B/param columns are the library's own figures for the optimizer
(:func:`lightning_precision.memory.measure_bytes_per_param`: steady state measured from the tensors; peak adds the
optimizer catalogue's estimate of the step's temporaries).

Usage (from the repository root)::

    python benchmarks/lm_convergence.py                          # every recipe, the documented default run
    python benchmarks/lm_convergence.py --recipes 32-true,bf16-true+adamw --steps 200 --out /tmp/lm
    # on a CUDA machine, with flashoptim's bf16-flash recipe (benchmarks/gpu/check.sh runs this):
    python benchmarks/lm_convergence.py --accelerator cuda \
        --recipes 32-true,bf16-mixed,bf16-true+adamw,bf16-true+compensated,bf16-true+optimi-kahan,bf16-flash
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from lightning_precision import (
    CheckedMixedPrecision,
    FlashPrecision,
    FSDP2Strategy,
    HalfPrecisionForAudio,
    PrecisionGuard,
)
from lightning_precision.demos import StdlibTextDataModule, cosine_lr_lambda
from lightning_precision.dtypes import dtype_name
from lightning_precision.memory import measure_bytes_per_param
from lightning_precision.optim import CompensatedAdamW

MODEL: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
"""The default model (1.84M parameters); ``--hidden`` and ``--layers`` change it (intermediate = 3 x hidden)."""

BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
REFERENCE, TRAP = "32-true", "bf16-true+adamw"
SEPARATION = 1.01  # the trap "separates" at the first eval where it is >1% worse than fp32 and stays so
WORKER_FLAG = "--worker"


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------
OptimizerFactory = Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Recipe:
    """How one precision recipe trains: the Trainer's precision arguments and the optimizer.

    Attributes:
        name: The ``--recipes`` name.
        summary: One line for ``--list`` and the docs.
        trainer_kwargs: ``() -> dict`` of Trainer arguments (``precision``, ``plugins``, ``strategy``), built in
            the worker so plugin objects are fresh per run.
        optimizer: ``(param_groups, lr) -> optimizer``; the groups carry their weight decay.
        optimizer_name: How the table names the optimizer.
        world: Processes; more than 1 launches ``torch.distributed.run`` on that many CPU ranks (gloo).
        in_default: Whether the default run (``--recipes default``) includes it; the others are studies selected
            by name or with ``all``.
        needs_cuda: Whether it runs only with ``--accelerator cuda``; without it the run lists it as skipped, with
            ``why_cuda``.
        why_cuda: Why, for that line.
    """

    name: str
    summary: str
    trainer_kwargs: Callable[[], dict[str, Any]]
    optimizer: OptimizerFactory
    optimizer_name: str
    world: int = 1
    in_default: bool = True
    needs_cuda: bool = False
    why_cuda: str = ""


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to :data:`RECIPES` (in registration order, the default order of the run)."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def _torch_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)


def _compensated(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return CompensatedAdamW(groups, lr=lr, betas=BETAS, eps=EPS)


def _compensated_second_moment(dtype: torch.dtype, rounding: str) -> OptimizerFactory:
    def make(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return CompensatedAdamW(
            groups, lr=lr, betas=BETAS, eps=EPS, exp_avg_sq_dtype=dtype, exp_avg_sq_rounding=rounding
        )

    return make


def _flash_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    from flashoptim import FlashAdamW

    # 24-bit masters through error-correction bits, quantized moments, the fused step: all CUDA-only in flashoptim.
    return FlashAdamW(groups, lr=lr, betas=BETAS, eps=EPS, master_weight_bits=24)


def _optimi_kahan(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    import optimi

    # optimi's weight decay is decoupled and scaled by lr (decouple_lr=False), as torch AdamW's.
    return optimi.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, kahan_sum=True)


register(Recipe("32-true", "fp32 storage and compute, torch AdamW (the reference)", lambda: {"precision": "32-true"},
                _torch_adamw, "torch.AdamW"))  # fmt: skip
register(Recipe("bf16-mixed", "fp32 storage, bf16 autocast, torch AdamW (CheckedMixedPrecision)",
                lambda: {"plugins": [CheckedMixedPrecision("bf16-mixed", on_unsafe="error")]},
                _torch_adamw, "torch.AdamW"))  # fmt: skip
register(Recipe(TRAP, "bf16 storage, torch AdamW: the trap (HalfPrecisionForAudio warns)",
                lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="warn")]},
                _torch_adamw, "torch.AdamW"))  # fmt: skip
register(Recipe("bf16-true+compensated", "bf16 storage, lightning_precision.optim.CompensatedAdamW",
                lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="error")]},
                _compensated, "CompensatedAdamW"))  # fmt: skip
register(Recipe("bf16-true+optimi-kahan", "bf16 storage, optimi.AdamW(kahan_sum=True)",
                lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="error")]},
                _optimi_kahan, "optimi.AdamW kahan"))  # fmt: skip
register(Recipe("fsdp2-auto x2", "FSDP2Strategy(storage_dtype='auto') + bf16-mixed, torch AdamW, 2 CPU ranks",
                lambda: {"precision": "bf16-mixed",
                         "strategy": FSDP2Strategy(storage_dtype="auto", optimizer="torch.optim.AdamW",
                                                   on_unsafe="error")},
                _torch_adamw, "torch.AdamW", world=2))  # fmt: skip
register(Recipe("bf16-flash", "bf16 storage (flashoptim.cast_model), flashoptim.FlashAdamW(master_weight_bits=24); CUDA",
                lambda: {"plugins": [FlashPrecision("bf16-flash", on_unsafe="error")]},
                _flash_adamw, "FlashAdamW mwb=24", needs_cuda=True,
                why_cuda="flashoptim's error-correction bits, quantized moments and fused step run only on CUDA",
                in_default=False))  # fmt: skip
# The accumulation study (accumulate_grad_dtype): against "bf16-true+compensated", whose micro-batch gradients autograd
# sums in bf16; run both with --accumulate-grad-batches N.
register(Recipe("bf16-true+compensated fp32-accum",
                "bf16 storage, CompensatedAdamW, HalfPrecisionForAudio(accumulate_grad_dtype='float32')",
                lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="error",
                                                           accumulate_grad_dtype="float32")]},
                _compensated, "CompensatedAdamW", in_default=False))  # fmt: skip
# The second-moment study: against "bf16-true+compensated", whose second moment is CompensatedAdamW's default (bf16,
# rounded stochastically), the fp32 one (12 B/param) and a bf16 one rounded to nearest.
register(Recipe("compensated v=fp32", "bf16 storage, CompensatedAdamW(exp_avg_sq_dtype=float32)",
                lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="error")]},
                _compensated_second_moment(torch.float32, "nearest"), "Compensated v=fp32",
                in_default=False))  # fmt: skip
for _rounding in ("nearest", "stochastic"):
    register(Recipe(f"compensated v=bf16 {_rounding}",
                    f"bf16 storage, CompensatedAdamW(exp_avg_sq_dtype=bfloat16, exp_avg_sq_rounding={_rounding!r})",
                    lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="warn")]},
                    _compensated_second_moment(torch.bfloat16, _rounding), f"Compensated v={_rounding[:4]}",
                    in_default=False))  # fmt: skip


def parse_recipes(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; ``"default"`` -> the default run's recipes; ``"all"`` -> every registered one.

    Raises:
        SystemExit: On an unknown name, naming it and the valid choices.
    """
    if text == "all":
        return list(RECIPES)
    if text == "default":
        return [name for name, recipe in RECIPES.items() if recipe.in_default]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise SystemExit(
            f"--recipes: unknown {unknown or text!r}; choose from {', '.join(RECIPES)} (or 'default', 'all')"
        )
    return names


# ---------------------------------------------------------------------------------------------------------------
# The model, the held-out evaluation and the memory probe (worker side)
# ---------------------------------------------------------------------------------------------------------------
def model_config(hidden: int, layers: int) -> dict[str, Any]:
    return {**MODEL, "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers}


def build_llama(config: dict[str, Any], seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # the same initial weights for every recipe
    return LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).float()


class LlamaLM(pl.LightningModule):
    """Next-byte prediction with a Llama; loss in fp32 from the model's logits, whatever the compute dtype."""

    def __init__(self, recipe: Recipe, config: dict[str, Any], seed: int, lr: float, warmup: int, steps: int) -> None:
        super().__init__()
        self.recipe, self.lr, self.warmup, self.steps = recipe, lr, warmup, steps
        self.model = build_llama(config, seed)
        self.train_losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        self.train_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # Weight decay on matrices only (embeddings and projections), not on the RMSNorm gains.
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.recipe.optimizer(groups, self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_lr_lambda(step, self.steps, self.warmup, min_lr_ratio=0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class HeldOutEval(pl.Callback):
    """fp32 held-out loss at step 0, every ``every`` optimizer steps and at the end.

    The current parameters (full tensors under FSDP2) are copied into an fp32 twin of the model, so every recipe is
    judged by the same fp32 arithmetic on the weights it actually holds. Under several ranks each rank evaluates
    rows ``rank::world`` and the sums are all-reduced.
    """

    def __init__(self, config: dict[str, Any], heldout: tuple[torch.Tensor, torch.Tensor], every: int) -> None:
        self.twin = build_llama(config, seed=0).eval()
        self.heldout, self.every = heldout, every
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: LlamaLM) -> None:
        self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: LlamaLM, *args: Any) -> None:
        step = trainer.global_step
        if (step % self.every == 0 or step == trainer.max_steps) and step != self.curve[-1][0]:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: LlamaLM) -> None:
        start = time.perf_counter()
        device = trainer.strategy.root_device
        self.twin.to(device)
        live = dict(pl_module.model.named_parameters())
        for name, p in self.twin.named_parameters():
            value = live[name]
            value = value.full_tensor() if hasattr(value, "full_tensor") else value  # an FSDP2 shard: gather
            p.copy_(value.detach().float())
        rank, world = trainer.global_rank, trainer.world_size
        inputs, labels = self.heldout[0][rank::world].to(device), self.heldout[1][rank::world].to(device)
        total = torch.zeros(2, dtype=torch.float64)
        with torch.autocast(device.type, enabled=False):
            for i in range(0, len(inputs), 16):
                logits = self.twin(input_ids=inputs[i : i + 16], use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels[i : i + 16].flatten(), reduction="sum")
                total += torch.tensor([float(loss), labels[i : i + 16].numel()], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(total)
        self.curve.append((trainer.global_step, float(total[0] / total[1])))
        self.seconds += time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


class PeakMemory(pl.Callback):
    """Peak resident set over the training batches (forward, backward and optimizer step), evaluation excluded.

    Put it first in the callbacks: its batch start resets the peak before the others' hooks, and its batch end
    reads it before the held-out evaluation runs.
    """

    def __init__(self) -> None:
        self.peak_kib = 0
        self.peak_cuda_bytes = 0
        self.baseline_kib = _status_kib("VmRSS")
        self._libc = ctypes.CDLL("libc.so.6")

    def on_train_batch_start(self, *args: Any) -> None:
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, *args: Any) -> None:
        self.peak_kib = max(self.peak_kib, _status_kib("VmHWM"))
        if torch.cuda.is_initialized():  # on a GPU the peak that matters is the device's
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, torch.cuda.max_memory_allocated())


class RankRows(Sampler[list[int]]):
    """Rows ``rank::world`` of each consecutive ``batch`` windows: the ranks together see the single-process batches."""

    def __init__(self, windows: int, batch: int, rank: int, world: int) -> None:
        self.windows, self.batch, self.rank, self.world = windows, batch, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.windows - self.batch + 1, self.batch):
            yield list(range(start + self.rank, start + self.batch, self.world))

    def __len__(self) -> int:
        return self.windows // self.batch


def worker(args: argparse.Namespace) -> None:
    """Train one recipe in this process (one rank of it under ``torch.distributed.run``) and write its JSON."""
    torch.set_num_threads(1)
    recipe = RECIPES[args.worker]
    rank, world = int(os.environ.get("RANK", "0")), recipe.world
    micro = args.batch_size // args.accumulate_grad_batches
    data = StdlibTextDataModule(
        seq_len=args.seq_len,
        batch_size=micro,
        num_windows=args.steps * args.batch_size,
        seed=args.seed,
        heldout_windows=args.heldout_windows,
    )
    data.setup()
    config = model_config(args.hidden, args.layers)
    module = LlamaLM(recipe, config, args.seed, args.lr, args.warmup, args.steps)
    evaluator = HeldOutEval(config, data.heldout_batch(), args.eval_every)
    memory = PeakMemory()
    if world > 1:
        loader = DataLoader(data.train_set, batch_sampler=RankRows(len(data.train_set), micro, rank, world))
    else:
        loader = data.train_dataloader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = harness.trainer(
            accelerator=args.accelerator,
            max_steps=args.steps,
            accumulate_grad_batches=args.accumulate_grad_batches,
            callbacks=[memory, evaluator, PrecisionGuard(log_table=False)],
            devices=world,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            **recipe.trainer_kwargs(),
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
    optimizer = trainer.optimizers[0]
    param = next(module.model.parameters())
    state = optimizer.state[param]
    result = {
        "recipe": recipe.name,
        "rank": rank,
        "curve": evaluator.curve,
        "train_losses": module.train_losses,
        "seconds": seconds,
        "eval_seconds": evaluator.seconds,
        "peak_rss_mib": memory.peak_kib / 1024,
        "peak_cuda_mib": memory.peak_cuda_bytes / 2**20 if memory.peak_cuda_bytes else None,
        "baseline_rss_mib": memory.baseline_kib / 1024,
        "bytes_per_param": measure_bytes_per_param(optimizer).to_dict(),
        "params": sum(p.numel() for p in evaluator.twin.parameters()),
        "storage": dtype_name(getattr(param, "_local_tensor", param).dtype),
        "state": "/".join(
            sorted({dtype_name(getattr(v, "_local_tensor", v).dtype) for v in state.values() if v.ndim > 0})
        ),
        "warnings": sorted({str(w.message)[:160] for w in caught if "PrecisionWarning" in type(w.message).__name__}),
    }
    out = Path(args.worker_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{recipe.name}.rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear gloo down explicitly: a group left for interpreter shutdown can abort a rank after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def _worker_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    script = str(Path(__file__).resolve())
    passed = [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in ("steps", "seed", "accumulate_grad_batches", "batch_size", "seq_len", "lr", "warmup",
                    "eval_every", "heldout_windows", "hidden", "layers", "accelerator")
    ]  # fmt: skip
    tail = [script, WORKER_FLAG, name, "--worker-out", str(out), *passed]
    world = RECIPES[name].world
    if world == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone", *tail]


def run_all(names: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Run the recipes as subprocesses, ``--cores`` processes at a time (a recipe takes one core per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    env["PYTHONWARNINGS"] = "ignore::UserWarning:lightning"  # Lightning's "few workers" hints flood stderr
    queue, running, results = list(names), {}, {}
    while queue or running:
        busy = sum(RECIPES[n].world for n in running)
        for name in list(queue):
            need = min(RECIPES[name].world, args.cores)
            if busy + need <= args.cores:
                log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
                proc = subprocess.Popen(_worker_command(name, args, out), stdout=log, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, log, time.perf_counter())
                queue.remove(name)
                busy += need
                print(f"started {name}", file=sys.stderr, flush=True)
        time.sleep(1.0)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                tail = (out / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"recipe {name} failed (exit {proc.returncode}):\n{tail}")
            ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(RECIPES[name].world)]
            results[name] = merge_ranks(ranks, time.perf_counter() - t0)
            print(f"finished {name} in {results[name]['wall']:.0f} s", file=sys.stderr, flush=True)
    return results


def merge_ranks(ranks: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One result per recipe: rank 0's curve (all-reduced, the same on every rank), the mean training loss over
    ranks (equal halves of each batch) and the largest per-rank peak."""
    first = dict(ranks[0])
    first["train_losses"] = [sum(v) / len(v) for v in zip(*(r["train_losses"] for r in ranks))]
    first["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ranks)
    first["peak_over_baseline_mib"] = max(r["peak_rss_mib"] - r["baseline_rss_mib"] for r in ranks)
    first["wall"] = wall
    return first


def separation_step(trap: list[tuple[int, float]], ref: list[tuple[int, float]]) -> int | None:
    """First eval step from which the trap's held-out loss stays > ``SEPARATION`` x the reference's (``None``: never)."""
    step = None
    for (s, a), (_, b) in reversed(list(zip(trap, ref))):
        if a > SEPARATION * b:
            step = s
        else:
            break
    return step


def skipped_recipes(names: list[str], accelerator: str) -> dict[str, str]:
    """The recipes among ``names`` that cannot run on ``accelerator``, with the reason."""
    skipped = {}
    for name in names:
        recipe = RECIPES[name]
        if recipe.needs_cuda and accelerator != "cuda":
            skipped[name] = f"needs --accelerator cuda ({recipe.why_cuda})"
        elif accelerator == "cuda" and recipe.world > torch.cuda.device_count():
            skipped[name] = f"needs {recipe.world} CUDA devices, {torch.cuda.device_count()} here"
    return skipped


def report(
    names: list[str],
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    corpus: str,
    skipped: dict[str, str] | None = None,
) -> str:
    ref = results.get(REFERENCE)
    first = results[names[0]]
    lines = [
        f"command: python benchmarks/lm_convergence.py {' '.join(sys.argv[1:])}".rstrip(),
        (
            f"python {sys.version.split()[0]}, torch {torch.__version__}; corpus hash {corpus} "
            f"(lightning_precision.demos.STDLIB_FILES, 8 held-out files)"
        ),
        (
            f"model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {first['params']:,} parameters; "
            f"{args.steps} steps x {args.batch_size} windows x {args.seq_len} bytes "
            f"({args.batch_size * args.seq_len} tokens/step), accumulate_grad_batches {args.accumulate_grad_batches}; "
            f"lr {args.lr:g}, warmup {args.warmup}, cosine to 10%; seed {args.seed}"
        ),
        (
            "held-out loss: fp32 cross entropy, nats/byte, on "
            f"{args.heldout_windows} windows of the held-out files; peak RSS: max over training batches (step included)"
        ),
        "",
    ]
    width = max(24, *(len(n) for n in names))
    head = (
        f"{'recipe':<{width}} {'storage':<9} {'optimizer':<18} {'state':<17} {'held-out':>9} {'ratio':>7} "
        f"{'train(last50)':>13} {'peak RSS':>9} {'over base':>9} {'B/p steady':>10} {'B/p peak':>8} {'s':>5}"
    )
    lines += [head, "-" * len(head)]
    for name in names:
        r = results[name]
        final = r["curve"][-1][1]
        ratio = f"{final / ref['curve'][-1][1]:.4f}" if ref else "-"
        bpp = r["bytes_per_param"]
        peak_bpp = "-" if bpp["peak"] is None else f"{bpp['peak']:.2f}"
        tail = r["train_losses"][-50:]
        lines.append(
            f"{name:<{width}} {r['storage']:<9} {RECIPES[name].optimizer_name:<18} {r['state']:<17} {final:>9.4f} "
            f"{ratio:>7} {sum(tail) / len(tail):>13.4f} {r['peak_rss_mib']:>8.0f}M {r['peak_over_baseline_mib']:>8.0f}M "
            f"{bpp['total']:>10.2f} {peak_bpp:>8} {r['wall']:>5.0f}"
        )
    lines.append("")
    steps = [s for s, _ in first["curve"]]
    picks = sorted({steps[round(i * (len(steps) - 1) / 10)] for i in range(11)})
    lines.append("held-out loss at step" + ("" if not ref else " (ratio to 32-true)"))
    lines.append(f"{'step':>6} " + " ".join(f"{n[:22]:>22}" for n in names))
    for step in picks:
        cells = []
        for name in names:
            loss = dict(results[name]["curve"])[step]
            rel = f" ({loss / dict(ref['curve'])[step]:.3f})" if ref else ""
            cells.append(f"{loss:.4f}{rel}".rjust(22))
        lines.append(f"{step:>6} " + " ".join(cells))
    if ref and TRAP in results:
        sep = separation_step(results[TRAP]["curve"], ref["curve"])
        lines.append("")
        lines.append(
            f"{TRAP} separates from 32-true (first eval where held-out loss is > {SEPARATION:.2f}x and stays so): "
            + ("never" if sep is None else f"step {sep}")
        )
    for name in names:
        if results[name]["warnings"]:
            lines.append(f"{name} warned: {results[name]['warnings'][0]}...")
    cuda = [(n, results[n]["peak_cuda_mib"]) for n in names if results[n].get("peak_cuda_mib")]
    if cuda:
        lines.append(
            f"peak CUDA memory allocated per training batch ({torch.cuda.get_device_name(0)}): "
            + ", ".join(f"{n} {mib:.0f} MiB" for n, mib in cuda)
        )
    for name, why in (skipped or {}).items():
        lines.append(f"{name}: skipped, {why}")
    return "\n".join(lines)


def plot(names: list[str], results: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ref = dict(results[REFERENCE]["curve"]) if REFERENCE in results else None
    for name in names:
        steps, losses = zip(*results[name]["curve"])
        style = {"linestyle": "-" if name in (REFERENCE, TRAP) else "--", "linewidth": 1.5}
        top.plot(steps, losses, label=name, **style)
        if ref:
            bottom.plot(steps, [v / ref[s] for s, v in zip(steps, losses)], label=name, **style)
    top.set_ylabel("held-out loss (fp32, nats/byte)")
    top.set_title(
        f"Llama {results[names[0]]['params'] / 1e6:.1f}M on stdlib bytes: {args.steps} steps, "
        f"{args.batch_size}x{args.seq_len} tokens/step, lr {args.lr:g} cosine to 10%"
    )
    lo = min(v for n in names for _, v in results[n]["curve"][len(results[n]["curve"]) // 5 :])
    top.set_ylim(0.95 * lo, 1.6 * lo + 0.5)
    top.legend(fontsize=9)
    for band in (0.99, SEPARATION):
        bottom.axhline(band, color="grey", linestyle=":", linewidth=1)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.set_ylim(0.97, 1.15)
    bottom.set_ylabel("held-out loss / 32-true\n(dotted: +-1%)")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipes", default="default", help=f"comma-separated, 'default' or 'all' ({', '.join(RECIPES)})"
    )
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="model init and training-window seed")
    parser.add_argument("--accumulate-grad-batches", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default steps // 20)")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out eval interval (default steps // 20)")
    parser.add_argument("--heldout-windows", type=int, default=128, help="held-out windows evaluated")
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--cores", type=int, default=2, help="processes at a time (FSDP2 takes one per rank)")
    parser.add_argument(
        "--accelerator", choices=("cpu", "cuda"), default="cpu",
        help="where every recipe trains; recipes that need CUDA are listed as skipped on cpu",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=harness.ROOT / "benchmarks/results/lm_convergence.txt",
        help="table file; the curves go to the same name with .json",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, default=harness.ROOT / "docs/img/lm_convergence.png")
    parser.add_argument(WORKER_FLAG, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    args.eval_every = max(1, args.steps // 20) if args.eval_every is None else args.eval_every
    if args.accumulate_grad_batches < 1 or args.batch_size % args.accumulate_grad_batches:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be a multiple of --accumulate-grad-batches "
            f"{args.accumulate_grad_batches} (the micro-batch is batch / N, so tokens per step stay the same)"
        )
    if args.worker:
        worker(args)
        return
    if args.list:
        for recipe in RECIPES.values():
            print(f"{recipe.name:<30} {recipe.summary}{'' if recipe.in_default else ' [not in the default run]'}")
        return
    names = parse_recipes(args.recipes)
    skipped = skipped_recipes(names, args.accelerator)
    names = [name for name in names if name not in skipped]
    if not names:
        raise SystemExit("nothing to run here: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    for name in names:
        world = RECIPES[name].world
        if world > 1 and (args.batch_size // args.accumulate_grad_batches) % world:
            raise SystemExit(f"{name}: the micro-batch must split evenly over {world} ranks")
    from lightning_precision.demos import load_corpus

    corpus = load_corpus().hash
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(names, args, Path(tmp))
    table = report(names, results, args, corpus, skipped) + f"\ntotal wall time {time.perf_counter() - start:.0f} s"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    curves = {n: {k: v for k, v in r.items()} for n, r in results.items()}
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus_hash": corpus, "results": curves}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    with contextlib.suppress(ImportError):
        plot(names, results, args, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
