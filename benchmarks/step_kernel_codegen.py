"""The compiled CompensatedAdamW kernel under each of the step's code-generation changes, per element on CPU.

Compiles the step's kernel three times in one process and times calls on the same tensors, interleaved:

* **loop step**: whole bf16 vectors a loop step (``half_precision_tiling``) and inductor's own code otherwise;
* **+ bit casts**: and bit casts in registers (``vector_bit_casts``);
* **+ native bf16**: and fp32-to-bf16 rounding with ``vcvtne2ps2bf16`` where the CPU has AVX512_BF16
  (``native_bf16_rounding``): the step's own backend, ``step_inductor``.

Both layouts: 12 B (fp32 second moment, no bit cast) and 10 B (bf16 second moment with stochastic rounding: two bit
casts per element). For reference, on fp32 tensors of the same size, in the same rounds: torch's fused AdamW
(``torch._fused_adamw_``, its whole step without the optimizer's Python) and torch AdamW's update written as one
function compiled with inductor's defaults, what the compensated kernel's bf16 conversions and Kahan arithmetic are
measured against. Usage (from the repository root)::

    taskset -c 0 python benchmarks/step_kernel_codegen.py
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch._inductor.compile_fx import compile_fx

from lightning_precision.optim import _compensated_step as eager
from lightning_precision.optim import _compiled_step
from lightning_precision.optim import _inductor_codegen as codegen

OPTIONS = {"emulate_precision_casts": True, "cpp.dynamic_threads": True}
NUMEL, CALLS = 2**19, 60


def _loop_step_only(graph, inputs):
    with codegen.half_precision_tiling(torch.bfloat16):
        return compile_fx(graph, inputs, config_patches=OPTIONS)


def _with_bit_casts(graph, inputs):
    with codegen.half_precision_tiling(torch.bfloat16), codegen.vector_bit_casts():
        return compile_fx(graph, inputs, config_patches=OPTIONS)


# Code objects of their own, so the compiles do not share dynamo's cache entries.
def _kernel_copy(*args):
    _compiled_step._kernel(*args)


def _kernel_copy2(*args):
    _compiled_step._kernel(*args)


def _fp32_adamw(p, g, m, v, s):
    # torch AdamW's update (decoupled weight decay, bias corrections in s[5] = -lr / bc1 and s[6] = sqrt(bc2)).
    p.mul_(1 - s[0] * s[3])
    m.lerp_(g, 1 - s[1])
    v.mul_(s[2]).addcmul_(g, g, value=1 - s[2])
    p.add_(m / (v.sqrt() / s[6] + s[4]) * s[5])


def _fp32_references() -> dict:
    """Callables stepping fp32 tensors of NUMEL elements: torch fused AdamW and the compiled fp32 update."""
    p, g, m, v = (torch.randn(NUMEL) for _ in range(4))
    v.abs_()
    step = torch.tensor(10.0)
    settings = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "eps": 1e-8}
    scalars = torch.tensor([1e-3, 0.9, 0.999, 0.01, 1e-8, -1e-3, 0.0316])
    compiled = torch.compile(_fp32_adamw, dynamic=True, fullgraph=True)
    return {
        "torch fused fp32": lambda: torch._fused_adamw_(
            [p], [g], [m], [v], [], [step], **settings, amsgrad=False, maximize=False
        ),
        "inductor fp32 AdamW": lambda: compiled(p, g, m, v, scalars),
    }


def _arguments(stochastic: bool) -> tuple:
    p, g, m, c = (torch.randn(NUMEL).to(torch.bfloat16) for _ in range(4))
    v = torch.rand(NUMEL).to(torch.bfloat16 if stochastic else torch.float32)
    hyper = eager.Hyper(0.9, 0.999, 1e-3, 1e-8, -1e-5, True, False)
    scalars = _compiled_step.kernel_scalars(hyper, torch.tensor([-1e-3]), torch.tensor([0.0316]))[0]
    keys = (None, torch.tensor(12345, dtype=torch.int32)) if stochastic else (None, None)
    base = torch.tensor(0, dtype=torch.int32) if stochastic else None
    return (p, g, m, v, c, scalars, (hyper.decays, hyper.maximize), keys, base)


def main() -> None:
    torch.set_num_threads(1)
    kernels = {
        "loop step": torch.compile(_kernel_copy, backend=_loop_step_only, dynamic=True, fullgraph=True),
        "+ bit casts": torch.compile(_kernel_copy2, backend=_with_bit_casts, dynamic=True, fullgraph=True),
        "+ native bf16": torch.compile(
            _compiled_step._kernel, backend=codegen.step_inductor(OPTIONS), dynamic=True, fullgraph=True
        ),
    }
    native = "yes" if codegen.native_bf16_rounding_available() else "no (the last two columns are the same code)"
    print(f"AVX512_BF16 rounding available: {native}")
    print(f"ns/element, median of {CALLS} interleaved calls of {NUMEL} elements, 1 thread, torch {torch.__version__}")
    references = _fp32_references()
    for layout, stochastic in (("12 B", False), ("10 B", True)):
        args = _arguments(stochastic)
        calls = {name: functools.partial(kernel, *args) for name, kernel in kernels.items()}
        calls.update(references)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # compile
        for _ in range(CALLS):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) / NUMEL * 1e9 for name, t in times.items()}
        print(f"{layout}: " + "  ".join(f"{name} {medians[name]:.3f}" for name in kernels))
    print("fp32 reference: " + "  ".join(f"{name} {medians[name]:.3f}" for name in references))


if __name__ == "__main__":
    main()
