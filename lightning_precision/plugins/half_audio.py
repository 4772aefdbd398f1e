"""True half precision (``bf16-true`` / ``fp16-true``) that keeps audio inputs in full precision."""

from __future__ import annotations

from lightning.pytorch.plugins.precision import HalfPrecision

from lightning_precision._plugin_common import TrueHalfMixin
from lightning_precision.plugins._checked import _CheckedHalfInputs


class HalfPrecisionForAudio(TrueHalfMixin, _CheckedHalfInputs, HalfPrecision):
    """Lightning's true half precision: parameters, activations and gradients in bf16/fp16.

    Inputs are cast to the half dtype except tensors under a preserved key (default: any key containing
    ``"audio"``), which keep their dtype. When Lightning connects the plugin, the optimizers are checked against the
    pairing rule: torch Adam/AdamW on half parameters keeps half-precision state, which ``on_unsafe`` reports.

    Args:
        precision: ``"bf16-true"``, or ``"fp16-true"`` (Lightning's spelling ``"16-true"`` is accepted).
        preserve_keys: Substring patterns of batch keys whose tensors keep their dtype, and integer positions of a
            top-level tuple or list batch (``[0]`` for NeMo's ``(audio, audio_len, tokens, tokens_len)``).
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing; ``None`` (default): the
            policy set elsewhere in the Trainer (guard, strategy, config), else ``"warn"``.
        peft: Only adapters train: the adapters are judged by their dtype, and kept fp32 (``keep_trainable_fp32``).
        fp32_modules: Submodules kept in fp32 (parameters, buffers, inputs, math), handing their outputs on in the
            half dtype: module-name patterns (``"frontend"``, ``"*.norm"``), class names or ``nn.Module`` types; a
            name that matches no module keeps that parameter or buffer's storage fp32 (``"cos"``). See
            :mod:`lightning_precision.fp32_modules`.
        accumulate_grad_dtype: ``"float32"`` sums the micro-batch gradients of ``accumulate_grad_batches > 1`` in
            fp32 buffers (4 B per half parameter while a step accumulates) and hands the sum to clipping and the
            optimizer, rounded once; ``None`` (default): autograd sums them in the half dtype, as Lightning does.
            Applies under automatic optimization only. See :mod:`lightning_precision.grad_accumulation`.
        keep_batchnorm_fp32: Keep every ``_BatchNorm`` module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) in fp32,
            as apex O2 did (default True): half-precision running statistics drift from the fp32 ones. The kept
            layers are listed in the contract's fp32 modules. ``False`` casts them with the rest.
        audio_preset: ``"whisper"``, ``"wav2vec2"`` or ``"nemo_asr"``: keep that model family's audio input and front
            end in fp32 (the table: :mod:`lightning_precision.audio_presets`). ``None`` (default): no preset.
        keep_trainable_fp32: Keep the trainable parameters fp32 and cast the frozen ones: ``None`` (default) when the
            model trains adapters, ``True`` whenever some are frozen, ``False`` never (the rule:
            :mod:`lightning_precision.trainable_fp32`).

    Raises:
        PrecisionConfigError: If ``precision`` is not a true half-precision string, or ``accumulate_grad_dtype`` is
            neither ``None`` nor float32, or ``audio_preset`` is not a preset name; when the model is converted or the
            first batch arrives, if the ``audio_preset`` finds none of its front-end modules or audio keys.
    """
