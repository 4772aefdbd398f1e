"""Validation of ``CompensatedAdamW``'s per-group options: hyperparameters and flags, state dtypes and rounding,
step implementation, chunk size. Every group (constructor defaults, a group dict, ``add_param_group``, a loaded state
dict) passes the same checks.

param_groups hold the canonical dtype names, not ``torch.dtype`` objects: distributed checkpoint (DCP) only saves
tensors, numbers, strings, None and containers of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_precision.dtypes import dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.optim._stochastic_rounding import ROUNDINGS
from lightning_precision.values import expect_type, parse_bool, parse_dtype_choice, parse_number

_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_OPTIONS = ("exp_avg_dtype", "exp_avg_sq_dtype")
_ROUNDING_OPTIONS = {"exp_avg_rounding": "exp_avg_dtype", "exp_avg_sq_rounding": "exp_avg_sq_dtype"}
# The options that decide the state's layout (bytes per parameter, how each moment is written).
LAYOUT_OPTIONS = (*_DTYPE_OPTIONS, *_ROUNDING_OPTIONS)
_IMPLEMENTATIONS = ("auto", "compiled", "chunked", "reference")
# "auto" is an option, not a way of rounding: each group resolves it (settle_roundings) before a step reads it.
_ROUNDING_CHOICES = ("auto", *ROUNDINGS)


def _state_dtype_name(name: str, value: torch.dtype | str) -> str:
    """The canonical name (``"bfloat16"``...) of a state dtype given as a torch.dtype or a spelling of one."""
    return dtype_name(parse_dtype_choice(value, what=name, choices=_STATE_DTYPES.values()))


def _check_implementation(value: Any) -> str:
    if value not in _IMPLEMENTATIONS:
        raise PrecisionConfigError(f"Invalid implementation: {value!r}; expected one of {list(_IMPLEMENTATIONS)}")
    return value


def _check_chunk_size(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise PrecisionConfigError(f"Invalid chunk_size: {value!r}; expected a positive int (elements) or None (auto)")


def _check_rounding(name: str, value: Any) -> str:
    if value not in _ROUNDING_CHOICES:
        raise PrecisionConfigError(f"Invalid {name}: {value!r}; expected one of {list(_ROUNDING_CHOICES)}")
    return value


def _check_rounding_seed(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise PrecisionConfigError(f"Invalid rounding_seed: {value!r}; expected an int in [0, 2**63)")


def settle_roundings(group: dict[str, Any]) -> None:
    """Resolve each ``"auto"`` rounding of a complete group to the one its moment's dtype calls for, in place, and
    refuse stochastic rounding of a moment not stored in bfloat16.

    ``"auto"`` is ``"stochastic"`` for a bfloat16 moment: each write is unbiased, so a bf16 second moment still decays
    at ``beta2=0.999`` (rounded to nearest it cannot: the 0.1% change is below half a bf16 ulp). It is ``"nearest"``
    for any other dtype: fp32 loses nothing, and stochastic rounding is implemented for bfloat16 only.

    Args:
        group: A complete parameter group (defaults merged in), or a config's complete options.

    Raises:
        PrecisionConfigError: If a moment is set to ``"stochastic"`` rounding but is not stored in bfloat16.
    """
    for rounding, dtype_key in _ROUNDING_OPTIONS.items():
        if group.get(rounding) == "auto":
            group[rounding] = "stochastic" if group[dtype_key] == "bfloat16" else "nearest"
        if group.get(rounding, "nearest") == "stochastic" and group[dtype_key] != "bfloat16":
            raise PrecisionConfigError(
                f"{rounding}='stochastic' rounds a bfloat16 moment, but {dtype_key} is {group[dtype_key]!r}: set "
                f"{dtype_key}=torch.bfloat16, or {rounding}='auto' (which rounds {group[dtype_key]} state to nearest)"
            )


def check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Check (and normalise to Python floats/bools) the AdamW hyperparameters present in ``group``.

    Args:
        group: A parameter group or the constructor defaults; only the keys present are checked.
        where: Suffix naming the group in messages, e.g. ``" (param group 1)"``.

    Raises:
        PrecisionConfigError: Naming the value and its valid range if ``lr`` is not a finite number >= 0, ``eps``
            not a finite number > 0 (0 divides 0 by 0 where a gradient has been zero), a beta not in [0, 1),
            ``weight_decay`` not a finite number >= 0, or ``maximize`` not a bool.
    """
    if "lr" in group:
        group["lr"] = parse_number(group["lr"], what=f"lr{where}", low=0.0)
    if "eps" in group:
        group["eps"] = parse_number(group["eps"], what=f"eps{where}", low=0.0, low_open=True)
    if "weight_decay" in group:
        group["weight_decay"] = parse_number(group["weight_decay"], what=f"weight_decay{where}", low=0.0)
    if "betas" in group:
        betas = group["betas"]
        if isinstance(betas, (str, bytes, torch.Tensor)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise PrecisionConfigError(f"Invalid betas{where}: {betas!r}; expected two values, e.g. (0.9, 0.999)")
        group["betas"] = tuple(
            parse_number(b, what=f"beta parameter at index {i}{where}", low=0.0, high=1.0, high_open=True)
            for i, b in enumerate(betas)
        )
    if "maximize" in group:
        group["maximize"] = parse_bool(group["maximize"], what=f"maximize{where}")


def _normalise_group_options(group: dict[str, Any], where: str = "") -> None:
    check_hyperparameters(group, where)
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


def check_new_group(group: Any, index: int) -> None:
    """Check a param group given to ``add_param_group`` (the constructor's groups included) and normalise it.

    Raises:
        TypeError: If ``group`` is not a dict, or its ``params`` not a tensor or an iterable of tensors.
        PrecisionConfigError: If an option is not one of the valid choices (the message names the group).
    """
    where = f"CompensatedAdamW param group {index}"
    expect_type(group, dict, what=where, expected="a dict with a 'params' entry")
    expected = "a tensor or an iterable of tensors"
    expect_type(group.get("params"), (torch.Tensor, Iterable), what=f"{where}['params']", expected=expected)
    _normalise_group_options(group, f" (param group {index})")


def check_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Check a config's ``CompensatedAdamW`` init args with the constructor's rules, without building it.

    ``explain`` and ``resolve_trainer_cfg`` ask this (through the optimizer catalogue), so an option the optimizer
    would refuse (``lr: -1``, ``exp_avg_dtype: float64``; a misspelt keyword is refused by the catalogue for every
    optimizer class) is an error where the config is read,
    not a "safe" verdict followed by a failure at fit start.

    Returns:
        The complete options the optimizer would have (defaults merged in, dtypes as names, ``"auto"`` roundings
        resolved), so the catalogue describes what it will keep.

    Raises:
        PrecisionConfigError: Naming the option, its value and the valid choices.
    """
    import inspect

    from lightning_precision.optim.compensated_adamw import CompensatedAdamW  # the constructor is the one source

    parameters = dict(inspect.signature(CompensatedAdamW.__init__).parameters)
    options = [name for name in parameters if name not in ("self", "params")]
    group = {name: parameters[name].default for name in options}
    group.update((k, v) for k, v in settings.items() if k in options)  # unknown names: the catalogue refused them
    _normalise_group_options(group)
    settle_roundings(group)
    return group
