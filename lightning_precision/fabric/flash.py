"""Flash precision (``bf16-flash`` / ``fp16-flash``) for Lightning Fabric and FlashOptim optimizers."""

from __future__ import annotations

from lightning_precision._plugin_common import FlashMixin
from lightning_precision.fabric._checked import _FabricHalfInputs


class FlashPrecision(FlashMixin, _FabricHalfInputs):
    """The Trainer's :class:`lightning_precision.plugins.FlashPrecision` for ``Fabric(plugins=[...])``.

    ``fabric.setup`` casts a float32 model once with :func:`flashoptim.cast_model` (a model already holding other
    floating-point dtypes is left as it is, as under the Trainer); no autocast, and
    ``torch.get_default_dtype()`` is never changed. Inputs are cast except preserved keys and positions, and each
    optimizer is judged before its first step (or by :func:`lightning_precision.fabric.check`).

    Args:
        precision: ``"bf16-flash"`` or ``"fp16-flash"`` (``"*-automodel"`` are deprecated aliases).
        preserve_keys: Key patterns and positions whose tensors keep their dtype (default: keys containing
            ``"audio"``).
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"``; ``None`` (default): the policy given to ``check``, else
            ``"warn"``.
        peft: Only adapters train: the storage dtype is left to the model; the adapters are still judged by their dtype.
        cast_model_kwargs: Extra arguments for :func:`flashoptim.cast_model`.
        fp32_modules: Submodules, or parameters and buffers by name, kept in fp32 (see
            :mod:`lightning_precision.fp32_modules`).
        accumulate_grad_dtype: ``"float32"`` sums the gradients of every ``fabric.backward`` between two optimizer
            steps in fp32 buffers (4 B per half parameter; ``param.grad`` stays ``None`` meanwhile) and hands the sum
            over, rounded once, in ``fabric.clip_gradients`` and the optimizer step; call
            :meth:`hand_over_gradients` to read ``param.grad`` before then. ``None`` (default): autograd sums in the
            half dtype. See :mod:`lightning_precision.grad_accumulation`.
        keep_batchnorm_fp32: Keep every ``_BatchNorm`` module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) in fp32,
            as apex O2 did (default True): half-precision running statistics drift from the fp32 ones. The kept
            layers are listed in the contract's fp32 modules. ``False`` leaves them to ``flashoptim.cast_model``,
            which keeps them fp32 too unless ``cast_model_kwargs={"selective": False}``.
        audio_preset: ``"whisper"``, ``"wav2vec2"`` or ``"nemo_asr"``: keep that model family's audio input and front
            end in fp32 (the table: :mod:`lightning_precision.audio_presets`). ``None`` (default): no preset.

    Raises:
        PrecisionConfigError: If ``precision`` is not a flash precision string, ``on_unsafe`` is not a policy, or
            ``accumulate_grad_dtype`` is neither ``None`` nor float32, or ``audio_preset`` is not a preset name; when
            the model is converted or the first batch arrives, if the ``audio_preset`` finds none of its front-end
            modules or audio keys.
    """
