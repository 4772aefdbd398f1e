"""Flash precision (``bf16-flash`` / ``fp16-flash``) for FlashOptim optimizers."""

from __future__ import annotations

from lightning_precision._plugin_common import FlashMixin
from lightning_precision.plugins._checked import _CheckedHalfInputs


class FlashPrecision(FlashMixin, _CheckedHalfInputs):
    """Half-precision storage for optimizers that keep their own master weights (FlashOptim's ``FlashAdamW``).

    A float32 module is cast once with :func:`flashoptim.cast_model`; a module that already holds other
    floating-point dtypes (loaded in bf16, an fp64 buffer) is left as it is (see
    :mod:`lightning_precision.flash_cast`). The modules ``cast_model`` keeps in fp32 (normalization layers with
    running statistics, ``full_precision_layers``) are listed in the contract's fp32 modules, tagged
    ``(flashoptim.cast_model)``, and the contract's ``model_cast`` says which of the two happened. Unlike Lightning's true half precision, this plugin never enters autocast and never changes
    ``torch.get_default_dtype()``: FlashOptim manages the master precision, and a global dtype override on top of
    it would change how user code creates tensors. Inputs are cast to the half dtype except tensors under a preserved
    key (default: any key containing ``"audio"``).

    Args:
        precision: ``"bf16-flash"`` or ``"fp16-flash"``. NeMo's ``"bf16-automodel"``/``"fp16-automodel"`` are
            deprecated aliases (``FutureWarning``).
        preserve_keys: Substring patterns of batch keys whose tensors keep their dtype, and integer positions of a
            top-level tuple or list batch (``[0]`` for NeMo's ``(audio, audio_len, tokens, tokens_len)``).
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe optimizer pairing (e.g. a torch optimizer,
            or ``FlashAdamW(master_weight_bits=None)``, on half parameters); ``None`` (default): the policy set
            elsewhere in the Trainer (guard, strategy, config), else ``"warn"``.
        peft: Only adapters train: the storage dtype is left to the model; the adapters are still judged by their dtype.
        cast_model_kwargs: Extra arguments for :func:`flashoptim.cast_model`, e.g. ``full_precision_layers``.
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
            layers are listed in the contract's fp32 modules. ``False`` leaves them to ``flashoptim.cast_model``,
            which keeps them fp32 too unless ``cast_model_kwargs={"selective": False}``.
        audio_preset: ``"whisper"``, ``"wav2vec2"`` or ``"nemo_asr"``: keep that model family's audio input and front
            end in fp32 (the table: :mod:`lightning_precision.audio_presets`). ``None`` (default): no preset.

    Raises:
        PrecisionConfigError: If ``precision`` is not a flash precision string, or ``accumulate_grad_dtype`` is neither
            ``None`` nor float32, or ``audio_preset`` is not a preset name; when the model is converted or the first
            batch arrives, if the ``audio_preset`` finds none of its front-end modules or audio keys.
    """
