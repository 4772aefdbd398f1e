"""Lightning's mixed precision (``bf16-mixed`` / ``16-mixed``) with the pairing check."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_precision._plugin_common import check_mixed
from lightning_precision.modes import MixedPrecisionInput
from lightning_precision.plugins._checked import _PairingCheck
from lightning_precision.policy import OnUnsafe


class CheckedMixedPrecision(_PairingCheck, MixedPrecision):
    """Autocast to bf16/fp16 while the parameters stay in the dtype they were loaded in.

    Mixed precision is only safe when that dtype is fp32: a model loaded in bf16 and trained under ``bf16-mixed``
    with torch AdamW keeps bf16 optimizer state all the same. When Lightning connects the plugin, the optimizers are
    checked against the pairing rule and ``on_unsafe`` decides what happens. Inputs are not cast (autocast does it).

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"``.
        device: Device type for ``torch.autocast`` (default: ``"cuda"`` if available, else ``"cpu"``).
        scaler: Optional gradient scaler for ``16-mixed``.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing; ``None`` (default): the
            policy set elsewhere in the Trainer (guard, strategy, config), else ``"warn"``.
        peft: Only adapters train: the pairing is not judged.

    Raises:
        PrecisionConfigError: If ``precision`` is not a mixed precision string.
    """

    def __init__(
        self,
        precision: MixedPrecisionInput = "bf16-mixed",
        device: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
    ) -> None:
        check_mixed(precision, type(self).__name__)
        super().__init__(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"), scaler)
        self._init_pairing_check(on_unsafe, peft)
