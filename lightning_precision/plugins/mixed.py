"""Lightning's mixed precision (``bf16-mixed`` / ``16-mixed``) with the pairing check."""

from __future__ import annotations

from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_precision._plugin_common import CheckedMixedMixin
from lightning_precision.plugins._checked import _PairingCheck


class CheckedMixedPrecision(CheckedMixedMixin, _PairingCheck, MixedPrecision):
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
        peft: Only adapters train: the storage dtype is left to the model; the adapters are still judged by their dtype.

    Raises:
        PrecisionConfigError: If ``precision`` is not a mixed precision string.
    """
