"""``FlashPrecision``'s cast: which models it casts, and what :func:`flashoptim.cast_model` keeps in fp32.

Only float32 tensors are cast. A model handed over already holding other floating-point tensors (loaded in bf16, an
fp64 buffer) keeps the dtypes its user chose, as NeMo's plugin leaves such modules. ``cast_model`` itself keeps some
modules in fp32 (normalization layers with running statistics, its ``full_precision_layers``): they are found after
the cast, from the tensors it left in fp32, so the contract lists what really happened rather than a copy of its rule.
"""

from __future__ import annotations

from collections import Counter
from itertools import chain

import torch
from torch.nn import Module

from lightning_precision.dtypes import dtype_name

_CAST_MARK = "_lightning_precision_flash_cast"  # (dtype, modules cast_model kept fp32) on a model this plugin cast
CAST_MODEL_TAG = " (flashoptim.cast_model)"  # how the contract tells the modules cast_model kept from fp32_modules


def chosen_dtypes(module: Module) -> dict[str, torch.dtype]:
    """The floating-point (and complex) parameters and buffers of ``module`` not in float32, by name."""
    tensors = chain(module.named_parameters(), module.named_buffers())
    return {n: t.dtype for n, t in tensors if (t.is_floating_point() or t.is_complex()) and t.dtype != torch.float32}


def describe_dtypes(held: dict[str, torch.dtype]) -> str:
    """``"4 bfloat16, 1 float64; e.g. 'lin.weight'"``."""
    counts = ", ".join(f"{n} {d}" for d, n in Counter(dtype_name(d) for d in held.values()).items())
    return f"{counts}; e.g. {next(iter(held))!r}"


def cast_float32_model(module: Module, dtype: torch.dtype, cast_model_kwargs: dict) -> tuple[str, ...]:
    """Cast an all-float32 ``module`` with :func:`flashoptim.cast_model`, leaving parameters of any other dtype
    (integer ones, which it would cast too) as they are, and mark it as cast.

    Returns:
        The outermost submodules ``cast_model`` kept in fp32, named relative to ``module``.
    """
    from flashoptim import cast_model

    others = [(p, p.data) for p in module.parameters() if p.dtype != torch.float32]
    cast_model(module, dtype=dtype, **cast_model_kwargs)
    for param, data in others:
        param.data = data
    kept = _left_in_fp32(module)
    setattr(module, _CAST_MARK, (dtype, kept))
    return kept


def earlier_cast(module: Module, dtype: torch.dtype) -> tuple[str, ...] | None:
    """The modules ``cast_model`` kept fp32 when this library cast ``module`` to ``dtype`` before (an earlier fit),
    or ``None`` if it did not."""
    mark = getattr(module, _CAST_MARK, None)
    return mark[1] if mark is not None and mark[0] == dtype else None


def _left_in_fp32(module: Module) -> tuple[str, ...]:
    """The outermost submodules whose floating-point tensors all stayed fp32 through the cast."""
    found: list[str] = []
    for name, sub in list(module.named_modules())[1:]:
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        tensors = [t for t in chain(sub.parameters(), sub.buffers()) if t.is_floating_point()]
        if tensors and all(t.dtype == torch.float32 for t in tensors):
            found.append(name)
    return tuple(found)
