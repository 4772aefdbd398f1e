"""Flash precision (``bf16-flash`` / ``fp16-flash``) for FlashOptim optimizers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

from torch.distributed.tensor import DTensor
from torch.nn import Module
from typing_extensions import override

from lightning_precision._logging import info_rank_zero
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS, PreserveKey
from lightning_precision.fp32_modules import Fp32ModuleSelector
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import FlashPrecisionInput, choices_text, get_mode, spellings
from lightning_precision.plugins._checked import _CheckedHalfInputs
from lightning_precision.policy import OnUnsafe

_FLASH_PRECISIONS = spellings("flash")


class FlashPrecision(_CheckedHalfInputs):
    """Half-precision storage for optimizers that keep their own master weights (FlashOptim's ``FlashAdamW``).

    The module is cast once with :func:`flashoptim.cast_model` (normalization layers with running statistics stay
    fp32). Unlike Lightning's true half precision, this plugin never enters autocast and never changes
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
        peft: Only adapters train: the pairing is not judged.
        cast_model_kwargs: Extra arguments for :func:`flashoptim.cast_model`, e.g. ``full_precision_layers``.
        fp32_modules: Submodules kept in fp32 (parameters, buffers, inputs, math), handing their outputs on in the
            half dtype: module-name patterns (``"frontend"``, ``"*.norm"``), class names or ``nn.Module`` types. See
            :mod:`lightning_precision.fp32_modules`.

    Raises:
        ValueError: If ``precision`` is not a flash precision string.
    """

    precision: str = "bf16-flash"

    def __init__(
        self,
        precision: FlashPrecisionInput = "bf16-flash",
        preserve_keys: Iterable[PreserveKey] | PreserveKey | None = DEFAULT_PRESERVE_KEYS,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        cast_model_kwargs: dict | None = None,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
    ) -> None:
        if precision not in _FLASH_PRECISIONS:
            raise PrecisionConfigError(
                f"`FlashPrecision(precision={precision!r})` is not supported. Valid choices: "
                f"{choices_text(spellings('flash', deprecated=False))}."
            )
        mode = get_mode(precision, what="FlashPrecision(precision=...)")  # warns for the deprecated aliases
        self.precision = mode.name
        self._desired_input_dtype = mode.compute_dtype
        self.cast_model_kwargs = dict(cast_model_kwargs or {})
        self._init_checks(preserve_keys, on_unsafe, peft, fp32_modules)

    @override
    def convert_module(self, module: Module) -> Module:
        """Cast the parameters to the half dtype, deciding per tensor.

        Sharded (DTensor) parameters are left as the strategy stored them; parameters already in the target dtype
        are not cast again; parameters in the other half dtype are refused rather than silently re-rounded.

        Raises:
            PrecisionConfigError: If a parameter is stored in the other half dtype (e.g. bf16 under ``fp16-flash``).
        """
        from flashoptim import cast_model

        dtype = self._desired_input_dtype
        params = dict(module.named_parameters())
        sharded = [n for n, p in params.items() if isinstance(p, DTensor)]
        other_half = [n for n, p in params.items() if p.dtype in HALF_DTYPES and p.dtype != dtype]
        if other_half:
            raise PrecisionConfigError(
                f"precision={self.precision!r} stores parameters in {dtype_name(dtype)}, but {len(other_half)} "
                f"parameters are {dtype_name(params[other_half[0]].dtype)} (e.g. {other_half[0]!r}). Load the model in "
                f"float32 or {dtype_name(dtype)}, or use the matching flash precision."
            )
        if sharded:
            info_rank_zero(
                f"FlashPrecision: {len(sharded)} parameters are sharded (DTensor); their storage dtype was set by the "
                "strategy and is left as is."
            )
            return module
        before = {n: p.dtype for n, p in params.items()}
        self._convert_keeping_fp32(module, lambda m: cast_model(m, dtype=dtype, **self.cast_model_kwargs))
        after = dict(module.named_parameters())
        cast = sum(1 for n, p in after.items() if before[n] != p.dtype)
        already = sum(1 for n in after if before[n] == dtype)
        kept = len(after) - cast - already
        info_rank_zero(
            f"FlashPrecision: cast {cast} parameters to {dtype_name(dtype)}, {already} were already "
            f"{dtype_name(dtype)}, {kept} kept in full precision (normalization layers / full_precision_layers / "
            "fp32_modules)."
        )
        return module

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return nullcontext()  # never touch torch's default dtype

    @override
    def module_init_context(self) -> AbstractContextManager:
        return nullcontext()

    @override
    def forward_context(self) -> AbstractContextManager:
        return nullcontext()  # no autocast: FlashOptim works on the half parameters directly
