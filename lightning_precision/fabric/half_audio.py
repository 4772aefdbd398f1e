"""True half precision (``bf16-true`` / ``fp16-true``) for Lightning Fabric, keeping audio inputs in full precision."""

from __future__ import annotations

from lightning.fabric.plugins.precision import HalfPrecision

from lightning_precision._plugin_common import TrueHalfMixin
from lightning_precision.fabric._checked import _FabricHalfInputs


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
        peft: Only adapters train: the adapters are judged by their dtype, and kept fp32 (``keep_trainable_fp32``).
        fp32_modules: Submodules, or parameters and buffers by name, kept in fp32 (see
            :mod:`lightning_precision.fp32_modules`).
        accumulate_grad_dtype: ``"float32"`` sums the gradients of every ``fabric.backward`` between two optimizer
            steps in fp32 buffers (4 B per half parameter; ``param.grad`` stays ``None`` meanwhile) and hands the sum
            over, rounded once, in ``fabric.clip_gradients`` and the optimizer step; call
            :meth:`hand_over_gradients` to read ``param.grad`` before then. ``None`` (default): autograd sums in the
            half dtype. See :mod:`lightning_precision.grad_accumulation`.
        keep_batchnorm_fp32: Keep every ``_BatchNorm`` module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) in fp32,
            as apex O2 did (default True): half-precision running statistics drift from the fp32 ones. The kept
            layers are listed in the contract's fp32 modules. ``False`` casts them with the rest.
        audio_preset: ``"whisper"``, ``"wav2vec2"`` or ``"nemo_asr"``: keep that model family's audio input and front
            end in fp32 (the table: :mod:`lightning_precision.audio_presets`). ``None`` (default): no preset.
        keep_trainable_fp32: Keep the trainable parameters fp32 and cast the frozen ones: ``None`` (default) when the
            model trains adapters, ``True`` whenever some are frozen, ``False`` never (the rule:
            :mod:`lightning_precision.trainable_fp32`).

    Raises:
        PrecisionConfigError: If ``precision`` is not a true half-precision string, ``on_unsafe`` is not a policy, or
            ``accumulate_grad_dtype`` is neither ``None`` nor float32, or ``audio_preset`` is not a preset name; when
            the model is converted or the first batch arrives, if the ``audio_preset`` finds none of its front-end
            modules or audio keys.
    """
