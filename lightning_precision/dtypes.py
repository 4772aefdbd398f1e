"""Parsing of dtype spellings used in YAML and Python configs."""

from __future__ import annotations

from typing import Any

import torch

from lightning_precision.errors import PrecisionConfigError

# Spellings users write in YAML (NeMo / HF `torch_dtype`), normalised to lower case.
_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
    "64": torch.float64,
}
HALF_DTYPES = (torch.bfloat16, torch.float16)
AUTO = "auto"


def parse_dtype(value: Any, *, what: str = "dtype") -> torch.dtype | None:
    """Turn a dtype spelling into a ``torch.dtype``.

    Args:
        value: A ``torch.dtype``, a spelling such as ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``,
            ``"fp32"``, or ``None``/``"auto"`` (returned as ``None``: not decided).
        what: Where the value came from, used in the error message (e.g. ``"model.torch_dtype"``).

    Returns:
        The floating-point dtype, or ``None`` when the value is unset or ``"auto"``.

    Raises:
        PrecisionConfigError: If the value is not a floating-point dtype spelling.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise PrecisionConfigError(f"{what}={value!r} is not a floating-point dtype.")
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        key = str(value).strip().lower()
        if key == AUTO:
            return None
        key = key.removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    choices = ", ".join(sorted(_DTYPE_ALIASES)) + ", auto"
    raise PrecisionConfigError(f"{what}={value!r} is not a dtype. Valid spellings: {choices} (optionally 'torch.').")


def dtype_name(dtype: torch.dtype | None) -> str:
    """Short display name: ``torch.bfloat16`` -> ``"bfloat16"``; ``None`` -> ``"-"``."""
    return "-" if dtype is None else str(dtype).removeprefix("torch.")
