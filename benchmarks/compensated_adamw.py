"""Final loss of bf16 AdamW recipes relative to an fp32 torch AdamW reference.

Two small full-batch tasks on a 2-layer MLP with a cosine lr schedule:

* memorize: 4096 random inputs -> 16 random labels, cross entropy, lr 1e-3.
* teacher: regression onto the built-in task's fixed random tanh teacher
  (``lightning_precision.demos.make_teacher_data``: 32 inputs, 64 hidden, 8 outputs), MSE, lr 1e-4.

Final loss = mean of the last 100 training losses, averaged over seeds; ratio is
to the fp32 reference of the same task. bytes/param counts parameters plus
optimizer state tensors (no gradients).

Usage:
    python benchmarks/compensated_adamw.py --steps 4000 --seeds 3 --threads 1
    # bf16 storage with fp32 compute (not in the default set):
    python benchmarks/compensated_adamw.py --threads 1 --tasks memorize --recipes \
        "fp32 torch + bf16 autocast" "bf16 torch, fp32 compute" "bf16 Compensated m=bf16 v=fp32, fp32 compute" \
        "bf16 Compensated m=fp32 v=fp32, fp32 compute"
    # the second-moment comparison (bf16 nearest vs bf16 stochastic rounding vs fp32):
    python benchmarks/compensated_adamw.py --threads 1 --recipes "bf16 Compensated m=bf16 v=bf16" \
        "bf16 Compensated m=bf16 v=bf16 stochastic" "bf16 Compensated m=bf16 v=fp32"
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_precision.demos import make_teacher_data
from lightning_precision.memory import measure_bytes_per_param
from lightning_precision.optim import CompensatedAdamW

N, D_IN, HIDDEN = 4096, 32, 128
TASKS = {"memorize": 1e-3, "teacher": 1e-4}  # task -> peak lr


def make_task(name: str, seed: int):
    if name == "teacher":
        data = make_teacher_data(
            N, in_features=D_IN, audio_features=0, out_features=8, teacher_hidden=64, seed=1000 + seed
        )
        return data["x"], data["y"], 8, lambda out, y: F.mse_loss(out.float(), y)
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, 16, (N,), generator=g)
    return x, y, 16, lambda out, y: F.cross_entropy(out.float(), y)


FP32_COMPUTE = ", fp32 compute"
BF16_WEIGHTS = ", bf16-rounded forward weights"  # fp32 master weights, forward at round_bf16(w), fp32 activations
BF16_GRADS = ", bf16-rounded grads"  # fp32 everything, gradients rounded to bf16 before the step
AT_P_PLUS_C = ", fp32 compute at p+c"  # CompensatedAdamW: forward in fp32 at p + compensation (gradient to p)


def make_optimizer(recipe: str, params, lr: float):
    wd = 1e-2
    for suffix in (FP32_COMPUTE, BF16_WEIGHTS, BF16_GRADS, AT_P_PLUS_C):
        recipe = recipe.removesuffix(suffix)
    if recipe in ("fp32 torch", "bf16 torch", "fp32 torch + bf16 autocast"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if recipe == "bf16 optimi (defaults)":
        import optimi

        return optimi.AdamW(params, lr=lr)  # betas (0.9, 0.99), eps 1e-6, kahan_sum auto
    if recipe == "bf16 optimi (torch betas)":
        import optimi

        return optimi.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    m, v, v_rounding = {
        "bf16 Compensated m=bf16 v=bf16": (torch.bfloat16, torch.bfloat16, "nearest"),
        "bf16 Compensated m=bf16 v=bf16 stochastic": (torch.bfloat16, torch.bfloat16, "stochastic"),
        "bf16 Compensated m=bf16 v=fp32": (torch.bfloat16, torch.float32, "nearest"),
        "bf16 Compensated m=fp32 v=fp32": (torch.float32, torch.float32, "nearest"),
        "bf16 Compensated m=fp32 v=bf16": (torch.float32, torch.bfloat16, "nearest"),
        "bf16 Compensated m=fp32 v=bf16 stochastic": (torch.float32, torch.bfloat16, "stochastic"),
    }[recipe]
    return CompensatedAdamW(
        params, lr=lr, weight_decay=wd, exp_avg_dtype=m, exp_avg_sq_dtype=v, exp_avg_sq_rounding=v_rounding
    )


RECIPES = [
    "fp32 torch",
    "fp32 torch + bf16 autocast",
    "bf16 torch",
    "bf16 optimi (defaults)",
    "bf16 optimi (torch betas)",
    "bf16 Compensated m=bf16 v=bf16",
    "bf16 Compensated m=bf16 v=bf16 stochastic",
    "bf16 Compensated m=bf16 v=fp32",
    "bf16 Compensated m=fp32 v=fp32",
]
# The second moment with an fp32 first moment (the three-way study's other half). Select with --recipes.
EXTRA_RECIPES_M_FP32 = ["bf16 Compensated m=fp32 v=bf16", "bf16 Compensated m=fp32 v=bf16 stochastic"]
# bf16 storage and bf16 gradients, but the forward/backward in fp32 (parameters upcast on the fly): separates the
# error of bf16 compute from that of the optimizer. Not run by default; select with --recipes.
EXTRA_RECIPES = [
    "bf16 torch" + FP32_COMPUTE,
    "bf16 Compensated m=bf16 v=fp32" + FP32_COMPUTE,
    "bf16 Compensated m=fp32 v=fp32" + FP32_COMPUTE,
    "fp32 torch" + BF16_WEIGHTS,
    "fp32 torch" + BF16_GRADS,
    "bf16 Compensated m=bf16 v=fp32" + AT_P_PLUS_C,
]


def run(recipe: str, task: str, seed: int, steps: int):
    x, y, d_out, loss_fn = make_task(task, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d_out))
    dtype = torch.float32 if recipe.startswith("fp32") else torch.bfloat16
    model.to(dtype)
    fp32_compute = recipe.endswith((FP32_COMPUTE, AT_P_PLUS_C))
    x = x.to(torch.float32 if fp32_compute else dtype)
    opt = make_optimizer(recipe, list(model.parameters()), TASKS[task])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    autocast = recipe.endswith("autocast")
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fp32_compute:
                upcast = {name: p.float() for name, p in model.named_parameters()}
                if recipe.endswith(AT_P_PLUS_C):
                    for name, p in model.named_parameters():
                        if "compensation" in opt.state.get(p, {}):
                            upcast[name] = upcast[name] + opt.state[p]["compensation"].float()
                out = torch.func.functional_call(model, upcast, (x,))
            elif recipe.endswith(BF16_WEIGHTS):  # straight-through: the gradient reaches the fp32 weight unchanged
                rounded = {n: p + (p.bfloat16().float() - p).detach() for n, p in model.named_parameters()}
                out = torch.func.functional_call(model, rounded, (x,))
            else:
                out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.endswith(BF16_GRADS):
            for p in model.parameters():
                p.grad = p.grad.bfloat16().float()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    final = torch.stack(losses[-100:]).mean().item()
    measured = measure_bytes_per_param(opt)
    return final, measured.params + measured.optimizer_state  # the table leaves gradients out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: much faster on a busy machine)"
    )
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=RECIPES,
        choices=RECIPES + EXTRA_RECIPES + EXTRA_RECIPES_M_FP32,
        help="subset of recipes (fp32 torch is always run)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = ["fp32 torch"] + [r for r in args.recipes if r != "fp32 torch"]

    print(f"steps={args.steps} seeds={args.seeds} N={N} MLP {D_IN}-{HIDDEN}-out, full batch, cosine lr, wd=1e-2")
    header = f"{'recipe':<46} {'task':<9} {'final loss':>11} {'ratio':>7} {'bytes/param':>11} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    reference: dict[str, float] = {}
    for task in args.tasks:
        for recipe in recipes:
            t0 = time.perf_counter()
            results = [run(recipe, task, seed, args.steps) for seed in range(args.seeds)]
            seconds = time.perf_counter() - t0
            final = sum(r[0] for r in results) / len(results)
            if recipe == "fp32 torch":
                reference[task] = final
            ratio = final / reference[task]
            print(
                f"{recipe:<46} {task:<9} {final:>11.4e} {ratio:>6.3f}x {results[0][1]:>11.2f} {seconds:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
