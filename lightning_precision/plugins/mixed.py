"""Lightning's mixed precision (``bf16-mixed`` / ``16-mixed``) with the pairing check."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_precision.errors import PrecisionConfigError
from lightning_precision.pairing import OnUnsafe
from lightning_precision.plugins._checked import _PairingCheck

_MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")


class CheckedMixedPrecision(_PairingCheck, MixedPrecision):
    """Autocast to bf16/fp16 while the parameters stay in the dtype they were loaded in.

    Mixed precision is only safe when that dtype is fp32: a model loaded in bf16 and trained under ``bf16-mixed``
    with torch AdamW keeps bf16 optimizer state all the same. When Lightning connects the plugin, the optimizers are
    checked against the pairing rule and ``on_unsafe`` decides what happens. Inputs are not cast (autocast does it).

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"``.
        device: Device type for ``torch.autocast`` (default: ``"cuda"`` if available, else ``"cpu"``).
        scaler: Optional gradient scaler for ``16-mixed``.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing.
        peft: Only adapters train: the pairing is not judged.

    Raises:
        ValueError: If ``precision`` is not a mixed precision string.
    """

    def __init__(
        self,
        precision: Literal["bf16-mixed", "16-mixed"] = "bf16-mixed",
        device: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        on_unsafe: OnUnsafe = "warn",
        peft: bool = False,
    ) -> None:
        if precision not in _MIXED_PRECISIONS:
            raise PrecisionConfigError(
                f"`CheckedMixedPrecision(precision={precision!r})` is not supported. Valid choices: 'bf16-mixed', "
                "'16-mixed'."
            )
        super().__init__(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"), scaler)
        self._init_pairing_check(on_unsafe, peft)
