"""Lightning Fabric's mixed precision (``bf16-mixed`` / ``16-mixed``) with the pairing check."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.precision import MixedPrecision
from typing_extensions import override

from lightning_precision._plugin_common import CheckedMixedMixin
from lightning_precision.fabric._checked import _FabricPairingCheck


class CheckedMixedPrecision(CheckedMixedMixin, _FabricPairingCheck, MixedPrecision):
    """The Trainer's :class:`lightning_precision.plugins.CheckedMixedPrecision` for ``Fabric(plugins=[...])``:
    autocast, parameters left as loaded, and each optimizer judged before its first step (a model loaded in bf16 by
    accident keeps bf16 AdamW state under autocast all the same). Inputs are not cast, as under the Trainer: autocast
    casts what each op needs, and raw audio keeps full precision.

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"``.
        device: Device type for ``torch.autocast`` (default: ``"cuda"`` if available, else ``"cpu"``).
        scaler: Optional gradient scaler for ``16-mixed``.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"``; ``None`` (default): the policy given to ``check``, else
            ``"warn"``.
        peft: Only adapters train: the storage dtype is left to the model; the adapters are still judged by their dtype.

    Raises:
        PrecisionConfigError: If ``precision`` is not a mixed precision string, or ``on_unsafe`` is not a policy.
    """

    @override
    def convert_input(self, data: Any) -> Any:
        # Fabric's MixedPrecision casts every floating-point input to the half dtype, audio included; the Trainer's
        # leaves inputs to autocast, which casts only what each op computes in half precision.
        return data
