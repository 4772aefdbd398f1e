"""Bytes per trainable parameter: estimated from the dtypes before a run, measured from the tensors after one.

The estimate is arithmetic on what the optimizer catalogue says an optimizer keeps
(:meth:`~lightning_precision.catalogue.OptimizerInfo.state_parts`): parameter storage, a gradient in the parameter
dtype, the optimizer's moments, and whatever protects a half-precision update (master/error-correction bytes, a Kahan
compensation buffer). It ignores
activations, allocator overhead and per-tensor scalars such as ``step``.

One definition of "peak" for every caller (``explain``, ``compare``, the docs): :data:`PEAK_DEFINITION`, computed by
:func:`step_temporaries`. What the step allocates depends on where the parameters live (torch's default step is the
multi-tensor one on accelerators, the per-tensor loop on the CPU), so that device is an input, never a guess made
differently in two places.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision.catalogue import OptimizerInfo, classify_optimizer, state_storage_tensors
from lightning_precision.pairing import trainable_params

GIB = 2**30
PEAK_DEFINITION = (
    "peak = steady state (params + grads + optimizer state) + what the optimizer step allocates on top, per the "
    "optimizer catalogue, for the device the parameters live on; activations and allocator overhead excluded"
)


def step_temporaries(info: OptimizerInfo | None, storage_dtype: torch.dtype, *, on_cpu: bool) -> float | None:
    """Bytes per parameter the optimizer step allocates on top of the steady state: the one function every peak uses.

    Args:
        info: The classified optimizer (``None``: no optimizer, no step, 0).
        storage_dtype: Dtype of the parameters.
        on_cpu: Whether the parameters live on the CPU (torch's default step there allocates no copy).

    Returns:
        The bytes, or ``None`` when the catalogue cannot size the step.
    """
    return 0.0 if info is None else info.step_transient(storage_dtype, on_cpu=on_cpu)


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
    storage_dtype: torch.dtype | None,
    info: OptimizerInfo | None,
    *,
    grad_dtype: torch.dtype | None = None,
    on_cpu: bool = False,
) -> MemoryEstimate | None:
    """Predict bytes per trainable parameter from the storage dtype and what the optimizer keeps.

    Args:
        storage_dtype: Dtype of the trainable parameters (``None``: unknown, no estimate).
        info: The classified optimizer (``None``: no optimizer given, params and grads only); its settings
            (``momentum``, ``quantize``, ``exp_avg_dtype``) are part of the classification.
        grad_dtype: Dtype the gradient is held in, when not the storage dtype (fp32 accumulation buffers).
        on_cpu: Whether the parameters will live on the CPU (default: an accelerator), for the peak.

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
        step_transient=step_temporaries(info, storage_dtype, on_cpu=on_cpu),
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
    transient = step_temporaries(classify_optimizer(optimizer), first.dtype, on_cpu=first.device.type == "cpu")
    return MemoryEstimate(
        params=param_bytes / numel,
        grads=grad_bytes / numel,
        optimizer_state=sum(by_key.values()) / numel,
        state_parts=parts,
        measured=True,
        step_transient=transient,
    )


@dataclass(frozen=True)
class DeviceMemory:
    """GiB one device holds for a model of ``params`` trainable parameters.

    Attributes:
        weights: Parameter storage.
        grads: Gradients.
        optimizer_state: Moments plus master/error-correction/compensation bytes.
        steady: Their sum, held between steps.
        peak: ``steady`` plus the step's temporaries (``None`` when the catalogue cannot size them); see
            :data:`PEAK_DEFINITION`.
    """

    weights: float
    grads: float
    optimizer_state: float
    steady: float
    peak: float | None

    def to_dict(self) -> dict[str, float | None]:
        """Plain data for JSON (GiB)."""
        return {k: getattr(self, k) for k in ("weights", "grads", "optimizer_state", "steady", "peak")}


def gib_per_device(estimate: MemoryEstimate, params: int, *, devices: int = 1, sharded: bool = False) -> DeviceMemory:
    """GiB per device for ``params`` trainable parameters.

    Args:
        estimate: Bytes per parameter.
        params: Trainable parameters of the whole model.
        devices: Devices the run uses.
        sharded: Whether parameters, gradients and optimizer state are sharded over the devices (FSDP2); otherwise
            every device holds a replica (DDP, one device). FSDP2's gathered copies of the blocks being computed are
            activations-like temporaries and not counted.

    Raises:
        ValueError: If ``params`` is negative or ``devices`` below 1.
    """
    if params < 0 or devices < 1:
        raise ValueError(f"params must be >= 0 and devices >= 1, got params={params}, devices={devices}")
    scale = params / (devices if sharded else 1) / GIB
    peak = estimate.peak
    return DeviceMemory(
        weights=estimate.params * scale,
        grads=estimate.grads * scale,
        optimizer_state=estimate.optimizer_state * scale,
        steady=estimate.total * scale,
        peak=None if peak is None else peak * scale,
    )


def _nbytes(tensor: torch.Tensor) -> int:
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor shard: count what this rank holds
    return local.numel() * local.element_size()
