"""True half precision (``bf16-true`` / ``fp16-true``) that keeps audio inputs in full precision."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.plugins.precision import HalfPrecision

from lightning_precision.casting import DEFAULT_PRESERVE_KEYS
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import TruePrecisionInput, choices_text, get_mode, spellings
from lightning_precision.plugins._checked import _CheckedHalfInputs
from lightning_precision.policy import OnUnsafe

_TRUE_PRECISIONS = spellings("true")


class HalfPrecisionForAudio(_CheckedHalfInputs, HalfPrecision):
    """Lightning's true half precision: parameters, activations and gradients in bf16/fp16.

    Inputs are cast to the half dtype except tensors under a preserved key (default: any key containing
    ``"audio"``), which keep their dtype. When Lightning connects the plugin, the optimizers are checked against the
    pairing rule: torch Adam/AdamW on half parameters keeps half-precision state, which ``on_unsafe`` reports.

    Args:
        precision: ``"bf16-true"``, or ``"fp16-true"`` (Lightning's spelling ``"16-true"`` is accepted).
        preserve_keys: Substring patterns of batch keys whose tensors keep their dtype.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing; ``None`` (default): the
            policy set elsewhere in the Trainer (guard, strategy, config), else ``"warn"``.
        peft: Only adapters train: the pairing is not judged.

    Raises:
        ValueError: If ``precision`` is not a true half-precision string.
    """

    def __init__(
        self,
        precision: TruePrecisionInput = "bf16-true",
        preserve_keys: Iterable[str] | str | None = DEFAULT_PRESERVE_KEYS,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
    ) -> None:
        if precision not in _TRUE_PRECISIONS:
            hint = ""
            try:
                hint = f" ({precision!r} is a {get_mode(precision).family} precision.)"
            except PrecisionConfigError:
                pass
            raise PrecisionConfigError(
                f"`HalfPrecisionForAudio(precision={precision!r})` is not supported. Valid choices: "
                f"{choices_text(_TRUE_PRECISIONS)}.{hint}"
            )
        super().__init__(get_mode(precision).name)  # Lightning's canonical "bf16-true" / "16-true"
        self._init_checks(preserve_keys, on_unsafe, peft)
