"""What the Trainer plugins (:mod:`lightning_precision.plugins`) and the Fabric plugins (:mod:`lightning_precision.fabric`)
share, framework-free: the precision-string validation, the pairing check call, audio-preserving input casting, the
fp32-module conversion and FlashPrecision's cast.

Each piece is a mixin listed before Lightning's precision class in a plugin's bases, so its hooks take precedence and
``super()`` reaches Lightning's (Trainer or Fabric) implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, get_args

import torch
from torch.distributed.tensor import DTensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision._logging import info_rank_zero
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS, PreserveKey, cast_batch, normalize_preserve_keys
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.fp32_modules import (
    Fp32ModuleSelector,
    add_fp32_boundaries,
    cast_keeping_fp32,
    normalize_fp32_modules,
    select_fp32,
)
from lightning_precision.grad_accumulation import Fp32GradAccumulator, parse_accumulate_grad_dtype
from lightning_precision.modes import (
    FlashPrecisionInput,
    MixedPrecisionInput,
    PrecisionMode,
    TruePrecisionInput,
    choices_text,
    get_mode,
    known_mode,
    spellings,
)
from lightning_precision.pairing import Verdict
from lightning_precision.policy import OnUnsafe, PolicyHolder, check_and_enforce
from lightning_precision.report import parameter_dtypes
from lightning_precision.trainable_fp32 import trainable_fp32_modules
from lightning_precision.upstream import FLASHOPTIM_DCP_CORRUPTION, require_unaffected
from lightning_precision.values import parse_bool

_TRUE_PRECISIONS = spellings("true")
_FLASH_PRECISIONS = spellings("flash")


def true_mode(precision: Any, plugin: str) -> PrecisionMode:
    """The mode of a true half-precision string given to ``plugin``.

    Raises:
        PrecisionConfigError: If ``precision`` is not a true half precision; names the family it belongs to, if any.
    """
    if precision not in _TRUE_PRECISIONS:
        hint = ""
        try:
            hint = f" ({precision!r} is a {get_mode(precision).family} precision.)"
        except PrecisionConfigError:
            pass
        raise PrecisionConfigError(
            f"`{plugin}(precision={precision!r})` is not supported. Valid choices: "
            f"{choices_text(_TRUE_PRECISIONS)}.{hint}"
        )
    return get_mode(precision)


def flash_mode(precision: Any, plugin: str) -> PrecisionMode:
    """The mode of a flash precision string given to ``plugin`` (the deprecated aliases warn).

    Raises:
        PrecisionConfigError: If ``precision`` is not a flash precision.
    """
    if precision not in _FLASH_PRECISIONS:
        raise PrecisionConfigError(
            f"`{plugin}(precision={precision!r})` is not supported. Valid choices: "
            f"{choices_text(spellings('flash', deprecated=False))}."
        )
    return get_mode(precision, what=f"{plugin}(precision=...)")


def check_mixed(precision: Any, plugin: str) -> str:
    """Validate a mixed precision string given to ``plugin`` (the choices its ``Literal`` type lists).

    Raises:
        PrecisionConfigError: If ``precision`` is not one of them.
    """
    choices = get_args(MixedPrecisionInput)
    if precision not in choices:
        raise PrecisionConfigError(
            f"`{plugin}(precision={precision!r})` is not supported. Valid choices: {choices_text(choices)}."
        )
    return precision


class PairingCheckMixin(PolicyHolder):
    """The pairing check every plugin of this library runs on the optimizers, under its ``on_unsafe`` policy."""

    precision: Any

    def _init_pairing_check(self, on_unsafe: OnUnsafe | None, peft: bool) -> None:
        self._init_policy(on_unsafe)
        self.peft = parse_bool(peft, what=f"{type(self).__name__}(peft=...)", spellings=True)

    def judge_optimizers(self, optimizers: Iterable[Optimizer], *, where: str = "") -> list[Verdict]:
        """Judge ``optimizers`` with the pairing rule under this plugin's policy, PEFT flag and precision.

        Raises:
            PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        """
        return check_and_enforce(
            optimizers,
            on_unsafe=self.on_unsafe,
            peft=self.peft,
            where=where or type(self).__name__,
            precision=known_mode(getattr(self, "precision", None)),
        )


class CheckedMixedMixin(PairingCheckMixin):
    """Lightning's mixed precision plus the pairing check. The constructor of both ``CheckedMixedPrecision`` classes
    (Trainer and Fabric), whose docstrings give the arguments."""

    def __init__(
        self,
        precision: MixedPrecisionInput = "bf16-mixed",
        device: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
    ) -> None:
        check_mixed(precision, type(self).__name__)
        # Lightning's MixedPrecision (Trainer or Fabric) is next in the MRO.
        super().__init__(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"), scaler)  # type: ignore[call-arg]
        self._init_pairing_check(on_unsafe, peft)


class HalfInputsMixin(PairingCheckMixin):
    """For the half plugins: casts batches with :func:`cast_batch`, keeping preserved keys, and keeps the chosen
    submodules in fp32 (:mod:`lightning_precision.fp32_modules`)."""

    _desired_input_dtype: torch.dtype

    def _init_checks(
        self,
        preserve_keys: PreserveKey | Iterable[PreserveKey] | None,
        on_unsafe: OnUnsafe | None,
        peft: bool,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
        accumulate_grad_dtype: str | torch.dtype | None = None,
        keep_batchnorm_fp32: bool = True,
    ) -> None:
        name = type(self).__name__
        self.preserve_keys = normalize_preserve_keys(preserve_keys)
        self.fp32_modules = normalize_fp32_modules(fp32_modules, what=f"{name}(fp32_modules=...)")
        self.keep_batchnorm_fp32 = parse_bool(keep_batchnorm_fp32, what=f"{name}(keep_batchnorm_fp32=...)")
        self.fp32_module_names: tuple[str, ...] = ()  # what convert_module kept in fp32, for the contract
        self.parameter_dtypes: tuple[str, str] = ("-", "-")  # trainable and frozen, once converted, for the contract
        self.accumulate_grad_dtype = parse_accumulate_grad_dtype(
            accumulate_grad_dtype, what=f"{name}(accumulate_grad_dtype=...)"
        )
        self.grad_accumulator = Fp32GradAccumulator(self.accumulate_grad_dtype) if self.accumulate_grad_dtype else None
        self._init_pairing_check(on_unsafe, peft)

    def _convert_keeping_fp32(self, module: Module, cast: Callable[[Module], Any]) -> Module:
        selectors = self.fp32_modules
        if self.keep_batchnorm_fp32 and any(isinstance(m, _BatchNorm) for m in module.modules()):
            # Running mean/var accumulated in half precision drift from the fp32 statistics (apex O2's
            # keep_batchnorm_fp32): BatchNorm layers, SyncBatchNorm included, stay fp32 and are listed in the contract.
            selectors = (*selectors, _BatchNorm)
        selection = select_fp32(module, selectors, also=self._trainable_fp32(module))
        cast_keeping_fp32(module, selection.modules, cast, selection.tensors)
        add_fp32_boundaries(selection.modules, self._desired_input_dtype)
        self.fp32_module_names = selection.names
        self.parameter_dtypes = parameter_dtypes(module)
        self._after_convert(module)
        return module

    def _trainable_fp32(self, module: Module) -> list[tuple[str, Module]]:
        """Modules kept fp32 for the trainable parameters (the half-true plugins keep adapters fp32)."""
        return []

    def _after_convert(self, module: Module) -> None:
        """Called with the converted module (the Fabric plugins hook the fp32 accumulation buffers here)."""

    def cast_inputs(self, batch: Any) -> Any:
        """Cast the floating-point tensors of ``batch`` to the half dtype, except under the preserved keys."""
        return cast_batch(batch, self._desired_input_dtype, self.preserve_keys)


class TrueHalfMixin(HalfInputsMixin):
    """True half precision: Lightning's ``HalfPrecision`` cast, except the ``fp32_modules``. The constructor of both
    ``HalfPrecisionForAudio`` classes (Trainer and Fabric), whose docstrings give the arguments."""

    def __init__(
        self,
        precision: TruePrecisionInput = "bf16-true",
        preserve_keys: Iterable[PreserveKey] | PreserveKey | None = DEFAULT_PRESERVE_KEYS,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
        accumulate_grad_dtype: str | torch.dtype | None = None,
        keep_batchnorm_fp32: bool = True,
        keep_trainable_fp32: bool | None = None,
    ) -> None:
        # Lightning's canonical "bf16-true" / "16-true", for its HalfPrecision (Trainer or Fabric) next in the MRO.
        super().__init__(true_mode(precision, type(self).__name__).name)  # type: ignore[call-arg]
        self._init_checks(
            preserve_keys, on_unsafe, peft, fp32_modules, accumulate_grad_dtype, keep_batchnorm_fp32=keep_batchnorm_fp32
        )
        what = f"{type(self).__name__}(keep_trainable_fp32=...)"
        self.keep_trainable_fp32 = None if keep_trainable_fp32 is None else parse_bool(keep_trainable_fp32, what=what)

    @override
    def _trainable_fp32(self, module: Module) -> list[tuple[str, Module]]:
        decision = trainable_fp32_modules(module, self.keep_trainable_fp32, peft=self.peft)
        if decision.reason is not None:
            info_rank_zero(decision.describe(type(self).__name__, dtype_name(self._desired_input_dtype)))
        return decision.modules

    @override
    def convert_module(self, module: Module) -> Module:
        """Cast the module to the half dtype, except the ``fp32_modules`` and, for adapter training, the trainable
        parameters (:mod:`lightning_precision.trainable_fp32`)."""
        return self._convert_keeping_fp32(module, super().convert_module)  # type: ignore[misc]


class FlashMixin(HalfInputsMixin):
    """Flash precision: ``flashoptim.cast_model`` once, no autocast, and torch's default dtype left alone. The
    constructor of both ``FlashPrecision`` classes (Trainer and Fabric), whose docstrings give the arguments."""

    precision: str = "bf16-flash"

    def __init__(
        self,
        precision: FlashPrecisionInput = "bf16-flash",
        preserve_keys: Iterable[PreserveKey] | PreserveKey | None = DEFAULT_PRESERVE_KEYS,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        cast_model_kwargs: dict | None = None,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
        accumulate_grad_dtype: str | torch.dtype | None = None,
        keep_batchnorm_fp32: bool = True,
    ) -> None:
        mode = flash_mode(precision, type(self).__name__)
        require_unaffected(FLASHOPTIM_DCP_CORRUPTION)  # its checkpoints would be corrupt: refuse before training
        self.precision = mode.name
        self._desired_input_dtype = mode.compute_dtype
        self.cast_model_kwargs = dict(cast_model_kwargs or {})
        self._init_checks(
            preserve_keys, on_unsafe, peft, fp32_modules, accumulate_grad_dtype, keep_batchnorm_fp32=keep_batchnorm_fp32
        )

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
        name = type(self).__name__
        if sharded:
            info_rank_zero(
                f"{name}: {len(sharded)} parameters are sharded (DTensor); their storage dtype was set by the "
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
            f"{name}: cast {cast} parameters to {dtype_name(dtype)}, {already} were already "
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
