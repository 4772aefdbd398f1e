"""Validation of ``CompensatedAdamW``'s per-group options: state dtypes and rounding, step implementation, chunk size.

param_groups hold the canonical dtype names, not ``torch.dtype`` objects: distributed checkpoint (DCP) only saves
tensors, numbers, strings, None and containers of them.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_precision.dtypes import dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.optim._stochastic_rounding import ROUNDINGS

_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_OPTIONS = ("exp_avg_dtype", "exp_avg_sq_dtype")
_ROUNDING_OPTIONS = {"exp_avg_rounding": "exp_avg_dtype", "exp_avg_sq_rounding": "exp_avg_sq_dtype"}
_IMPLEMENTATIONS = ("chunked", "reference")


def _state_dtype_name(name: str, value: torch.dtype | str) -> str:
    """The canonical name (``"bfloat16"``...) of a state dtype given as a torch.dtype or a spelling of one."""
    try:
        dtype = parse_dtype(value, what=name) if value != "auto" else None
    except PrecisionConfigError:
        dtype = None
    if dtype is None or dtype_name(dtype) not in _STATE_DTYPES:
        raise PrecisionConfigError(
            f"Invalid {name}: {value!r}; expected torch.float32, torch.bfloat16, torch.float16 or a spelling of one "
            "(e.g. 'fp32', 'bf16', 'float16')"
        )
    return dtype_name(dtype)


def _check_implementation(value: Any) -> str:
    if value not in _IMPLEMENTATIONS:
        raise PrecisionConfigError(f"Invalid implementation: {value!r}; expected one of {list(_IMPLEMENTATIONS)}")
    return value


def _check_chunk_size(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise PrecisionConfigError(f"Invalid chunk_size: {value!r}; expected a positive int (elements) or None (auto)")


def _check_rounding(name: str, value: Any) -> str:
    if value not in ROUNDINGS:
        raise PrecisionConfigError(f"Invalid {name}: {value!r}; expected one of {list(ROUNDINGS)}")
    return value


def _check_rounding_seed(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise PrecisionConfigError(f"Invalid rounding_seed: {value!r}; expected an int in [0, 2**63)")


def check_rounding_dtypes(group: dict[str, Any]) -> None:
    """Stochastic rounding is a way of writing a bfloat16 moment: refuse it for a moment stored in another dtype.

    Args:
        group: A complete parameter group (defaults merged in).

    Raises:
        PrecisionConfigError: If a moment is set to ``"stochastic"`` rounding but is not stored in bfloat16.
    """
    for rounding, dtype_key in _ROUNDING_OPTIONS.items():
        if group.get(rounding, "nearest") == "stochastic" and group[dtype_key] != "bfloat16":
            raise PrecisionConfigError(
                f"{rounding}='stochastic' rounds a bfloat16 moment, but {dtype_key} is {group[dtype_key]!r}: set "
                f"{dtype_key}=torch.bfloat16, or {rounding}='nearest' (the only rounding of {group[dtype_key]} state)"
            )


def _normalise_group_options(group: dict[str, Any]) -> None:
    for key in _DTYPE_OPTIONS:
        if key in group:
            group[key] = _state_dtype_name(key, group[key])
    for key in _ROUNDING_OPTIONS:
        if key in group:
            _check_rounding(key, group[key])
    if "rounding_seed" in group:
        _check_rounding_seed(group["rounding_seed"])
    if "implementation" in group:
        _check_implementation(group["implementation"])
    if "chunk_size" in group:
        _check_chunk_size(group["chunk_size"])
