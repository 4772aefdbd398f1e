"""Parsers of user-supplied values: booleans, numbers and dtypes, each checked against its valid set.

Every parser takes ``what`` (where the value came from, e.g. ``"CompensatedAdamW(lr=...)"``) and raises
:class:`~lightning_precision.errors.PrecisionConfigError` (a ``ValueError``) naming the value and the valid choices.
Nothing is truth-tested: ``bool("false")`` is True, so a string is a boolean only where the caller allows spellings.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_precision.errors import PrecisionConfigError

__all__ = ["PATH_TYPES", "expect_type", "parse_bool", "parse_dtype_choice", "parse_number"]

PATH_TYPES = (str, os.PathLike)
"""What a path argument may be (``str`` or ``pathlib.Path``), for :func:`expect_type`."""

# YAML 1.1 / environment-variable spellings, accepted only with ``spellings=True``.
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(value: Any, *, what: str, spellings: bool = False) -> bool:
    """Read a boolean.

    Args:
        value: The value to read.
        what: Where it came from, for the error message.
        spellings: Also accept the strings ``"true"``/``"false"`` (any case) and ``yes/no``, ``on/off``, ``1/0``, and
            the integers 0 and 1, as config files and environment variables write them (``${oc.env:PEFT,false}``
            arrives as the string ``"false"``). Python APIs leave it False: ``maximize="false"`` is
            then refused rather than read.

    Returns:
        The boolean.

    Raises:
        PrecisionConfigError: If ``value`` is not a ``bool`` (or, with ``spellings``, one of the spellings).
    """
    if isinstance(value, bool):
        return value
    if spellings and isinstance(value, int) and value in (0, 1):
        return bool(value)
    if spellings and isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    valid = "True or False" + (f", 0/1, or one of the strings {', '.join(_TRUE + _FALSE)}" if spellings else "")
    raise PrecisionConfigError(f"Invalid {what}: {value!r} ({type(value).__name__}); expected {valid}")


def expect_type(value: Any, types: type | tuple[type, ...], *, what: str, expected: str) -> None:
    """Refuse an argument of the wrong type where a public function receives it, not deep inside.

    ``read_precision_contract(None)`` would otherwise fail in ``torch.load`` with an ``AttributeError`` about ``seek``.

    Args:
        value: The argument.
        types: The valid types, as ``isinstance`` takes them (e.g. :data:`PATH_TYPES` plus ``Mapping``).
        what: The argument, e.g. ``"read_precision_contract(checkpoint=...)"``.
        expected: What it should be, in words (``"a checkpoint path or a loaded checkpoint dict"``).

    Raises:
        TypeError: Naming the argument, the type it got and what it expects.
    """
    if not isinstance(value, types):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
        raise TypeError(f"{what} expects {expected}, got {type(value).__name__}: {shown}")


def _describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def parse_number(
    value: Any,
    *,
    what: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float | int:
    """Read a finite real number within a range.

    Args:
        value: The value to read: a Python/NumPy real number (``bool`` and tensors are refused: ``lr=True`` is a
            mistake, and a tensor would hide a device value).
        what: Where it came from, for the error message.
        low: Smallest valid value, or None for no bound.
        high: Largest valid value, or None for no bound.
        low_open: Whether ``low`` itself is invalid (``value > low``).
        high_open: Whether ``high`` itself is invalid (``value < high``).
        integer: Require an integer (returned as ``int``).

    Returns:
        The value as ``float`` (``int`` with ``integer``).

    Raises:
        PrecisionConfigError: If ``value`` is not a real number, is nan or infinite, or lies outside the range.
    """
    kind = "an int" if integer else "a finite number"
    bounds = _describe_range(low, high, low_open, high_open)
    expected = f"expected {kind}{' ' + bounds if bounds else ''}"
    valid_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, valid_type):
        raise PrecisionConfigError(f"Invalid {what}: {value!r} ({type(value).__name__}); {expected}")
    number = int(value) if integer else float(value)
    if not math.isfinite(number):
        raise PrecisionConfigError(f"Invalid {what}: {value!r}; {expected}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise PrecisionConfigError(f"Invalid {what}: {value!r}; {expected}")
    return number


def parse_dtype_choice(
    value: Any, *, what: str, choices: Iterable[torch.dtype], aliases: Mapping[str, torch.dtype] | None = None
) -> torch.dtype:
    """Read a dtype given as a ``torch.dtype`` or a name, and check it is one of ``choices``.

    Args:
        value: A ``torch.dtype`` or a spelling (``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``"fp32"``...).
        what: Where it came from, for the error message.
        choices: The valid dtypes.
        aliases: Extra spellings (lower case) on top of :func:`lightning_precision.dtypes.parse_dtype`'s.

    Returns:
        The ``torch.dtype``.

    Raises:
        PrecisionConfigError: If ``value`` names no dtype, or one outside ``choices``.
    """
    from lightning_precision.dtypes import parse_dtype

    valid = tuple(choices)
    dtype = None
    if isinstance(value, str) and aliases and value.strip().lower() in aliases:
        dtype = aliases[value.strip().lower()]
    elif isinstance(value, (str, torch.dtype)) and value != "auto":
        try:
            dtype = parse_dtype(value, what=what)
        except PrecisionConfigError:
            dtype = None
    if dtype not in valid:
        names = ", ".join(str(d) for d in valid)
        raise PrecisionConfigError(
            f"Invalid {what}: {value!r}; expected one of {names} or a spelling of one (e.g. 'fp32', 'bf16', 'float16')"
        )
    return dtype
