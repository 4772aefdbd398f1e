"""True half precision (``bf16-true`` / ``fp16-true``) for Lightning Fabric, keeping audio inputs in full precision."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lightning.fabric.plugins.precision import HalfPrecision

from lightning_precision._plugin_common import TrueHalfMixin, true_mode
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS, PreserveKey
from lightning_precision.fabric._checked import _FabricHalfInputs
from lightning_precision.fp32_modules import Fp32ModuleSelector
from lightning_precision.modes import TruePrecisionInput
from lightning_precision.policy import OnUnsafe


class HalfPrecisionForAudio(TrueHalfMixin, _FabricHalfInputs, HalfPrecision):
    """Fabric's true half precision with the behaviour of the Trainer's
    :class:`lightning_precision.plugins.HalfPrecisionForAudio`, for ``Fabric(plugins=[...])``.

    ``fabric.setup`` casts the model to the half dtype except the ``fp32_modules``; the forward call's inputs are cast
    except preserved keys and positions (see :meth:`convert_input`). Each optimizer is judged by the pairing rule
    before its first step, or earlier by :func:`lightning_precision.fabric.check`.

    Args:
        precision: ``"bf16-true"``, or ``"fp16-true"`` (Lightning's spelling ``"16-true"`` is accepted).
        preserve_keys: Key patterns and positions whose tensors keep their dtype (default: keys containing
            ``"audio"``).
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing; ``None`` (default): the
            policy given to ``check``, else ``"warn"``.
        peft: Only adapters train: the pairing is not judged.
        fp32_modules: Submodules kept in fp32 (see :mod:`lightning_precision.fp32_modules`).

    Raises:
        PrecisionConfigError: If ``precision`` is not a true half-precision string, or ``on_unsafe`` is not a policy.
    """

    def __init__(
        self,
        precision: TruePrecisionInput = "bf16-true",
        preserve_keys: Iterable[PreserveKey] | PreserveKey | None = DEFAULT_PRESERVE_KEYS,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
    ) -> None:
        super().__init__(true_mode(precision, type(self).__name__).name)  # Fabric's canonical "bf16-true"/"16-true"
        self._init_checks(preserve_keys, on_unsafe, peft, fp32_modules)
