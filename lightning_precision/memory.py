"""Bytes per trainable parameter: estimated from the dtypes before a run, measured from the tensors after one.

The estimate is arithmetic on what the optimizer catalogue says an optimizer keeps
(:meth:`~lightning_precision.catalogue.OptimizerInfo.state_parts`): parameter storage, a gradient in the parameter
dtype, the optimizer's moments, and whatever protects a half-precision update (master/error-correction bytes, a Kahan
compensation buffer). It ignores
activations, allocator overhead and per-tensor scalars such as ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision.catalogue import OptimizerInfo, classify_optimizer, state_storage_tensors
from lightning_precision.pairing import trainable_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per trainable parameter, split by what holds them.

    Attributes:
        params: Parameter storage.
        grads: Gradient (the parameter's dtype, or the fp32 accumulation buffer's while a step accumulates).
        optimizer_state: Moments plus master/error-correction/compensation bytes.
        state_parts: ``(name, bytes)`` for each part of the optimizer state, e.g. ``("exp_avg bfloat16", 2.0)``.
        measured: Whether the numbers were read from live tensors rather than predicted from dtypes.
        step_transient: What the optimizer step allocates on top of the steady state (``None``: not known), so
            :attr:`peak` is what the process reaches during the step, not only what it holds between steps.
    """

    params: float
    grads: float
    optimizer_state: float
    state_parts: tuple[tuple[str, float], ...] = ()
    measured: bool = False
    step_transient: float | None = None

    @property
    def total(self) -> float:
        """Parameters + gradients + optimizer state: the steady state between steps."""
        return self.params + self.grads + self.optimizer_state

    @property
    def peak(self) -> float | None:
        """The steady state plus the step's temporaries (``None`` when those are not known)."""
        return None if self.step_transient is None else self.total + self.step_transient

    def describe(self) -> str:
        """One line, e.g. ``"~8 B/param: params 2 + grads 2 + optimizer state 4 (exp_avg bfloat16 2, ...)"``."""
        parts = ", ".join(f"{name} {_num(b)}" for name, b in self.state_parts)
        prefix = "" if self.measured else "~"
        suffix = "measured" if self.measured else "estimate from dtypes"
        peak = "unknown" if self.peak is None else f"~{_num(self.peak)}"  # the step's temporaries are estimated
        return (
            f"{prefix}{_num(self.total)} B/param: params {_num(self.params)} + grads {_num(self.grads)} + optimizer "
            f"state {_num(self.optimizer_state)}{f' ({parts})' if parts else ''}; peak during the step {peak} "
            f"[{suffix}]"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer_state": self.optimizer_state,
            "total": self.total,
            "step_transient": self.step_transient,
            "peak": self.peak,
            "state_parts": dict(self.state_parts),
            "measured": self.measured,
        }


def _num(value: float) -> str:
    return f"{value:.4g}"


def estimate_bytes_per_param(
    storage_dtype: torch.dtype | None, info: OptimizerInfo | None, *, grad_dtype: torch.dtype | None = None
) -> MemoryEstimate | None:
    """Predict bytes per trainable parameter from the storage dtype and what the optimizer keeps.

    Args:
        storage_dtype: Dtype of the trainable parameters (``None``: unknown, no estimate).
        info: The classified optimizer (``None``: no optimizer given, params and grads only); its settings
            (``momentum``, ``quantize``, ``exp_avg_dtype``) are part of the classification.
        grad_dtype: Dtype the gradient is held in, when not the storage dtype (fp32 accumulation buffers).

    Returns:
        The estimate, or ``None`` when the storage dtype is not known.
    """
    if storage_dtype is None:
        return None
    size = storage_dtype.itemsize
    parts = [] if info is None else info.state_parts(storage_dtype)
    return MemoryEstimate(
        params=float(size),
        grads=float((grad_dtype or storage_dtype).itemsize),
        optimizer_state=float(sum(b for _, b in parts)),
        state_parts=tuple(parts),
        step_transient=info.step_transient(storage_dtype) if info is not None else 0.0,
    )


# ---------------------------------------------------------------------------------------------------------------
# Measuring live tensors
# ---------------------------------------------------------------------------------------------------------------


def measure_bytes_per_param(optimizer: torch.optim.Optimizer) -> MemoryEstimate:
    """Measure bytes per trainable parameter from the tensors an optimizer holds.

    Counts every trainable parameter the optimizer updates, its gradient (in the parameter dtype when it was
    already released with ``zero_grad(set_to_none=True)``) and every tensor of the optimizer state, including
    flashoptim's quantized values and scales.

    Args:
        optimizer: An optimizer that has stepped at least once.

    Returns:
        The measurement (``measured=True``); all zeros if it updates no trainable parameter.
    """
    params = trainable_params(optimizer)
    numel = sum(p.numel() for p in params)
    if not numel:
        return MemoryEstimate(0.0, 0.0, 0.0, measured=True)
    param_bytes = sum(_nbytes(p) for p in params)
    grad_bytes = sum(_nbytes(p.grad) if p.grad is not None else _nbytes(p) for p in params)
    by_key: dict[str, int] = {}
    for p in params:
        for key, value in (optimizer.state.get(p) or {}).items():
            by_key[str(key)] = by_key.get(str(key), 0) + sum(_nbytes(t) for t in state_storage_tensors(value))
    parts = tuple((key, b / numel) for key, b in by_key.items() if b)
    # The steady state is read from the tensors; what the step allocates on top is the catalogue's estimate.
    first = params[0]
    transient = classify_optimizer(optimizer).step_transient(first.dtype, on_cpu=first.device.type == "cpu")
    return MemoryEstimate(
        params=param_bytes / numel,
        grads=grad_bytes / numel,
        optimizer_state=sum(by_key.values()) / numel,
        state_parts=parts,
        measured=True,
        step_transient=transient,
    )


def _nbytes(tensor: torch.Tensor) -> int:
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor shard: count what this rank holds
    return local.numel() * local.element_size()
