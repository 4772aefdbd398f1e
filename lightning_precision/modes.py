"""The precision strings this library understands and what each does to the three dtypes.

Storage is the dtype of the resident parameter (what the optimizer updates), compute is the dtype of
forward/backward. ``storage=None`` means the precision leaves storage to the model (Lightning's
``*-mixed`` modes autocast whatever the model holds), so the pairing rule decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR as _LIGHTNING_PRECISIONS

from lightning_precision._logging import warn_once
from lightning_precision.errors import PrecisionConfigError

Family = Literal["lightning", "true", "flash"]


@dataclass(frozen=True)
class PrecisionMode:
    """What one precision string means.

    Attributes:
        name: Canonical precision string.
        family: ``"lightning"`` (Lightning handles it as is), ``"true"`` (HalfPrecisionForAudio) or
            ``"flash"`` (FlashPrecision).
        compute_dtype: Dtype of forward/backward math.
        storage_dtype: Dtype the precision forces on the parameters, or ``None`` if it leaves them alone.
        autocast: Whether forward runs under ``torch.autocast``.
    """

    name: str
    family: Family
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype | None
    autocast: bool = False

    @property
    def half_dtype(self) -> torch.dtype | None:
        """The half dtype this mode trains in, or ``None`` for full-precision modes."""
        return self.compute_dtype if self.compute_dtype in (torch.bfloat16, torch.float16) else None

    @property
    def casts_inputs(self) -> bool:
        """Whether the plugin casts floating-point batch tensors to the half dtype."""
        return self.family in ("true", "flash")


_BF16, _FP16, _FP32, _FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

MODES: dict[str, PrecisionMode] = {
    m.name: m
    for m in (
        PrecisionMode("32-true", "lightning", _FP32, _FP32),
        PrecisionMode("64-true", "lightning", _FP64, _FP64),
        PrecisionMode("bf16-mixed", "lightning", _BF16, None, autocast=True),
        PrecisionMode("16-mixed", "lightning", _FP16, None, autocast=True),
        PrecisionMode("bf16-true", "true", _BF16, _BF16),
        PrecisionMode("16-true", "true", _FP16, _FP16),
        PrecisionMode("bf16-flash", "flash", _BF16, _BF16),
        PrecisionMode("fp16-flash", "flash", _FP16, _FP16),
    )
}

# Other spellings: Lightning's legacy short forms, and NeMo's names.
_ALIASES: dict[str, str] = {
    "32": "32-true",
    "64": "64-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    "fp16-true": "16-true",
}
_DEPRECATED: dict[str, str] = {
    "bf16-automodel": "bf16-flash",
    "fp16-automodel": "fp16-flash",
}

# The plugin Lightning (Trainer and Fabric alike) builds for each precision string it handles itself, by class name in
# ``lightning.pytorch.plugins.precision`` (``lightning.fabric.plugins.precision`` has the same names).
LIGHTNING_PLUGINS: dict[str, str] = {
    "32-true": "Precision",
    "64-true": "DoublePrecision",
    "bf16-mixed": "MixedPrecision",
    "16-mixed": "MixedPrecision",
    "bf16-true": "HalfPrecision",
    "16-true": "HalfPrecision",
}

VALID_PRECISIONS: tuple[str, ...] = tuple(MODES) + tuple(_ALIASES) + tuple(_DEPRECATED)

# Precisions Lightning accepts that this library does not model (e.g. "transformer-engine"): passed to Lightning
# unchanged. Read from Lightning itself, so a precision it adds later passes through too.
LIGHTNING_ONLY_PRECISIONS: tuple[str, ...] = tuple(
    p for p in get_args(_LIGHTNING_PRECISIONS) if p not in MODES and p not in _ALIASES
)


def spellings(family: Family, *, deprecated: bool = True) -> tuple[str, ...]:
    """Every precision string of one family: canonical names, their ``<half>-<family>`` aliases, deprecated ones.

    Lightning's bare legacy forms (``"16"``, ``"bf16"``) are left out: they name Lightning's own plugins.
    """
    names = [n for n, m in MODES.items() if m.family == family]
    names += [a for a, n in _ALIASES.items() if MODES[n].family == family and "-" in a]
    if deprecated:
        names += [a for a, n in _DEPRECATED.items() if MODES[n].family == family]
    return tuple(names)


def choices_text(names: tuple[str, ...]) -> str:
    """The precision strings as an error message lists them: ``'bf16-true', '16-true', 'fp16-true'``."""
    return ", ".join(repr(n) for n in names)


# The ``Literal`` types of the plugins' ``precision`` arguments (LightningCLI validates against them), derived from the
# table above so that a precision added there is accepted by its plugin.
TruePrecisionInput: Any = Literal[spellings("true")]  # type: ignore[valid-type]
FlashPrecisionInput: Any = Literal[spellings("flash")]  # type: ignore[valid-type]
MixedPrecisionInput: Any = Literal[tuple(n for n, m in MODES.items() if m.autocast)]  # type: ignore[valid-type]


def is_lightning_only(precision: object) -> bool:
    """Whether ``precision`` is a Lightning precision string this library leaves to Lightning unchanged."""
    return isinstance(precision, str) and precision in LIGHTNING_ONLY_PRECISIONS


def _spelling(precision: object, what: str) -> str | None:
    """The lookup key of a precision value: the string itself, or Lightning's legacy int as a string.

    A string is taken only as written: Lightning and the plugins compare precision strings exactly, so a spelling
    that this library would read (``"BF16-TRUE"``, ``"bf16-mixed "``) but they would refuse is an error here, naming
    the exact spelling to use, instead of a verdict on one string and a run on another.
    """
    if isinstance(precision, bool) or not isinstance(precision, (str, int)):
        return None
    key = str(precision)
    canonical = key.strip().lower()
    if key != canonical and (canonical in VALID_PRECISIONS or canonical in LIGHTNING_ONLY_PRECISIONS):
        raise PrecisionConfigError(
            f"{what}={precision!r} is not spelled as Lightning and the plugins expect it; write {canonical!r} "
            "(precision strings are lowercase, without spaces)."
        )
    return key


def get_mode(precision: str | int, *, what: str = "precision") -> PrecisionMode:
    """Look up a precision string.

    Args:
        precision: A precision string (``"bf16-true"``, ``"bf16-flash"``, ...) or Lightning's legacy int.
        what: Where the value came from, used in messages.

    Returns:
        The mode. Deprecated NeMo spellings emit a ``FutureWarning`` (once, on rank zero) and return the flash mode.

    Raises:
        PrecisionConfigError: If the string is unknown (the message lists the valid choices), or a known one written
            in another case or with spaces (the message names the spelling to use).
    """
    key = _spelling(precision, what)
    if key in _DEPRECATED:
        warn_once(
            f"deprecated:{key}",
            f"{what}={precision!r} is deprecated; use {_DEPRECATED[key]!r}, which means the same.",
            FutureWarning,
        )
        key = _DEPRECATED[key]
    key = _ALIASES.get(key, key)
    if key not in MODES:
        raise PrecisionConfigError(
            f"{what}={precision!r} is not a precision this library knows. Valid choices: {choices_text(VALID_PRECISIONS)}"
            f" (and, passed to Lightning unchanged: {choices_text(LIGHTNING_ONLY_PRECISIONS)})."
        )
    return MODES[key]


def known_mode(precision: object) -> PrecisionMode | None:
    """The mode of a precision string this library models, ``None`` for anything else (e.g. ``transformer-engine``)."""
    try:
        return get_mode(precision) if isinstance(precision, (str, int)) and not isinstance(precision, bool) else None
    except PrecisionConfigError:
        return None
