"""Bytes per trainable parameter held after the first optimizer step, measured from the tensors, for each recipe.

Each recipe of ``lightning-precision compare`` trains the built-in task for one optimizer step through the library's
own path (:func:`lightning_precision.cli.train.fit_task`); then
:func:`lightning_precision.memory.measure_bytes_per_param` counts the parameters, their gradients and every
optimizer-state tensor (the ``step`` scalars included). Next to it: the arithmetic from the dtypes (:func:`lightning_precision.memory.estimate_bytes_per_param`), which is also the
only figure for FlashAdamW (its quantized moments and error-correction bits need CUDA).

Usage (from the repository root)::

    python benchmarks/memory.py

Per-rank bytes under FSDP2 on 2 processes: ``python benchmarks/fsdp2_memory.py``.
"""

from __future__ import annotations

import argparse

import torch

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.cli.compare import RECIPES, quiet_lightning, recipe_config
from lightning_precision.cli.train import fit_task
from lightning_precision.memory import estimate_bytes_per_param, measure_bytes_per_param

STORAGE = {"32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _parts(parts: tuple[tuple[str, float], ...]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in parts) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with quiet_lightning():
        for name, recipe in RECIPES.items():
            cfg = recipe.optimizer
            info = classify_optimizer(cfg)
            storage = STORAGE.get(recipe.precision, torch.bfloat16)
            estimate = estimate_bytes_per_param(storage, info)
            if recipe.needs_cuda and not torch.cuda.is_available():
                rows.append((name, recipe.precision, info.short_name, None, estimate, "needs CUDA: arithmetic only"))
                continue
            run = fit_task(recipe_config(recipe, 1, 0))
            measured = measure_bytes_per_param(run.trainer.optimizers[0])
            numel = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
            rows.append((name, recipe.precision, info.short_name, measured, estimate, f"{numel} params, 1 step"))

    head = (
        f"{'recipe':<22} {'optimizer':<17} {'params':>6} {'grads':>5} {'state':>6} {'total':>6} "
        f"{'estimate':>8}  measured optimizer state (bytes/param)"
    )
    print("Bytes per trainable parameter after the first optimizer step (built-in task, measured from the tensors)")
    print(head)
    print("-" * len(head))
    for name, _precision, opt, measured, estimate, note in rows:
        est = _fmt(estimate.total) if estimate else "-"
        if measured is None:
            print(
                f"{name:<22} {opt:<17} {_fmt(estimate.params):>6} {_fmt(estimate.grads):>5} "
                f"{_fmt(estimate.optimizer_state):>6} {'-':>6} {est:>8}  {note}: {_parts(estimate.state_parts)}"
            )
            continue
        print(
            f"{name:<22} {opt:<17} {_fmt(measured.params):>6} {_fmt(measured.grads):>5} "
            f"{_fmt(measured.optimizer_state):>6} {_fmt(measured.total):>6} {est:>8}  {_parts(measured.state_parts)}"
        )
    print(
        "estimate = arithmetic from the dtypes (lightning_precision.memory.estimate_bytes_per_param): params + grads + "
        "moments + master/error-correction/compensation bytes; it leaves out per-tensor scalars such as `step`."
    )
    flash = next(r for r in rows if r[0] == "bf16-flash")[4]
    print(
        f"FlashAdamW(master_weight_bits=24) on bf16 params, arithmetic: {_fmt(flash.total)} B/param with a bf16 "
        f"gradient, {_fmt(flash.total - flash.grads)} without (gradient release); flashoptim's docstring: "
        "'16 bytes/param' -> '4 bytes/param' with all optimizations (1 optimizer state + 3 master weight + 0 gradient)."
    )


if __name__ == "__main__":
    main()
