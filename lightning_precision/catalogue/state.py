"""Reading a live optimizer's state tensors (flashoptim wraps them; the moments kept are the catalogue's)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_precision.catalogue.families import classify_optimizer
from lightning_precision.catalogue.info import OptimizerInfo


def state_tensor(value: Any) -> torch.Tensor | None:
    """The tensor behind one state entry: the tensor, or what a wrapper stores (flashoptim's ``_MaybeQuantizedTensor``
    holds its fp/bf16 values or, quantized on CUDA, int8 values whose ``.data`` would raise)."""
    if isinstance(value, torch.Tensor):
        return value
    for attr in ("_data", "_quantized"):
        tensor = getattr(value, attr, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    value = getattr(value, "data", None)
    return value if isinstance(value, torch.Tensor) else None


def state_storage_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors that hold one state entry in memory: the tensor, or a wrapper's quantized values and scales."""
    if isinstance(value, torch.Tensor):
        return [value]
    found = []
    for attr in ("_data", "_quantized", "_scales"):  # flashoptim's _MaybeQuantizedTensor keeps one or the other
        tensor = getattr(value, attr, None)
        if isinstance(tensor, torch.Tensor):
            found.append(tensor)
    return found


def observed_moment_dtypes(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], info: OptimizerInfo | None = None
) -> dict[str, torch.dtype]:
    """The dtype of each moment the optimizer really keeps for the first of ``params`` it has state for.

    ``info`` is the optimizer's classification when the caller already has it (it is looked up otherwise).
    """
    keys = (info or classify_optimizer(optimizer)).moments or ("exp_avg", "exp_avg_sq")
    for p in params:
        state = optimizer.state.get(p) or {}
        found = {k: t.dtype for k in keys if (t := state_tensor(state.get(k))) is not None}
        if found:
            return found
    return {}


def observed_second_moment_dtype(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], info: OptimizerInfo | None = None
) -> torch.dtype | None:
    """The second-moment dtype kept for ``params`` once stepped (single-moment optimizers: the moment they keep)."""
    found = observed_moment_dtypes(optimizer, params, info)
    return found.get("exp_avg_sq", next(iter(found.values()), None))
