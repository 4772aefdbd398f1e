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

from lightning_precision._logging import info_once, info_rank_zero, warn_once
from lightning_precision.audio_presets import (
    AudioPresetName,
    find_front_end,
    get_audio_preset,
    missing_inputs_message,
    suggest_preset,
)
from lightning_precision.casting import (
    DEFAULT_PRESERVE_KEYS,
    PreserveKey,
    cast_batch,
    holds_preserved,
    normalize_preserve_keys,
)
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.flash_cast import (
    CAST_MODEL_TAG,
    cast_float32_model,
    chosen_dtypes,
    describe_dtypes,
    earlier_cast,
)
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
from lightning_precision.pairing import Api, Verdict
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
    pairing_api: Api = "trainer"  # whose arguments the fixes of an unsafe verdict name

    def _init_pairing_check(self, on_unsafe: OnUnsafe | None, peft: bool) -> None:
        self._init_policy(on_unsafe)
        self.peft = parse_bool(peft, what=f"{type(self).__name__}(peft=...)", spellings=True)

    def judge_optimizers(
        self,
        optimizers: Iterable[Optimizer],
        *,
        where: str = "",
        storage_was_auto: bool = False,
        precision: PrecisionMode | None = None,
    ) -> list[Verdict]:
        """Judge ``optimizers`` with the pairing rule under this plugin's policy, PEFT flag and precision.

        Args:
            optimizers: The live optimizers.
            where: Where they are judged, for the messages (default: the plugin's class name).
            storage_was_auto: Whether ``"auto"`` chose the storage dtype (a sharding plan's decision).
            precision: The precision the storage was planned for (default: this plugin's).

        Raises:
            PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        """
        return check_and_enforce(
            optimizers,
            on_unsafe=self.on_unsafe,
            peft=self.peft,
            where=where or type(self).__name__,
            storage_was_auto=storage_was_auto,
            precision=precision or known_mode(getattr(self, "precision", None)),
            api=self.pairing_api,
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
        audio_preset: AudioPresetName | None = None,
    ) -> None:
        name = type(self).__name__
        self.audio_preset = get_audio_preset(audio_preset, what=f"{name}(audio_preset=...)")
        keys = normalize_preserve_keys(preserve_keys)
        # The preset's audio keys are kept as well as the ones given (the default "audio" included).
        self.preserve_keys = tuple(dict.fromkeys((*keys, *self.audio_preset.input_keys))) if self.audio_preset else keys
        self._preset_inputs_found = False
        self.fp32_modules = normalize_fp32_modules(fp32_modules, what=f"{name}(fp32_modules=...)")
        self.keep_batchnorm_fp32 = parse_bool(keep_batchnorm_fp32, what=f"{name}(keep_batchnorm_fp32=...)")
        self.fp32_module_names: tuple[str, ...] = ()  # what convert_module kept in fp32, for the contract
        self.fp32_module_objects: tuple[Module, ...] = ()
        self.model_cast = ""  # what convert_module did to the model's dtypes, for the contract ("": not reported)
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
        if self.audio_preset is not None:
            selectors = (*selectors, *find_front_end(module, self.audio_preset))
            self._preset_inputs_found = False  # each fit (or fabric.setup) checks its first batch again
        selection = select_fp32(module, selectors, also=self._trainable_fp32(module))
        cast_keeping_fp32(module, selection.modules, cast, selection.tensors)
        add_fp32_boundaries(selection.modules, self._desired_input_dtype)
        self.fp32_module_names = selection.names
        self.fp32_module_objects = tuple(m for _, m in selection.modules)
        self.parameter_dtypes = parameter_dtypes(module)
        if self.audio_preset is None:
            self._suggest_audio_preset(module)
        self._after_convert(module)
        return module

    def _trainable_fp32(self, module: Module) -> list[tuple[str, Module]]:
        """Modules kept fp32 for the trainable parameters (the half-true plugins keep adapters fp32)."""
        return []

    def _suggest_audio_preset(self, module: Module) -> None:
        """Say once, without changing anything, when the model has a front end that a preset would keep in fp32."""
        found = suggest_preset(module, list(self.fp32_module_names))
        if found is not None:
            preset, half_names = found
            info_once(
                f"audio_preset:{preset.name}",
                f"{type(self).__name__}: {preset.title}'s audio front end ({', '.join(half_names)}) runs in "
                f"{dtype_name(self._desired_input_dtype)}, and so does its input unless preserve_keys names it: "
                f"audio_preset={preset.name!r} keeps both in fp32.",
            )

    def _after_convert(self, module: Module) -> None:
        """Called with the converted module (the Fabric plugins hook the fp32 accumulation buffers here)."""

    def cast_inputs(self, batch: Any) -> Any:
        """Cast the floating-point tensors of ``batch`` to the half dtype, except under the preserved keys."""
        return cast_batch(batch, self._desired_input_dtype, self.preserve_keys)

    def check_preset_inputs(self, *batch_parts: Any) -> None:
        """With an ``audio_preset``: until one is found, the batch (given in parts: a Fabric call's arguments and
        keywords) must hold a floating-point tensor under the preset's keys or positions.

        Raises:
            PrecisionConfigError: If it holds none: the audio would be cast to half precision without a word.
        """
        preset = self.audio_preset
        if preset is None or self._preset_inputs_found:
            return
        if not any(holds_preserved(part, preset.input_keys) for part in batch_parts):
            raise PrecisionConfigError(missing_inputs_message(preset, batch_parts))
        self._preset_inputs_found = True


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
        audio_preset: AudioPresetName | None = None,
        keep_trainable_fp32: bool | None = None,
    ) -> None:
        # Lightning's canonical "bf16-true" / "16-true", for its HalfPrecision (Trainer or Fabric) next in the MRO.
        super().__init__(true_mode(precision, type(self).__name__).name)  # type: ignore[call-arg]
        self._init_checks(
            preserve_keys,
            on_unsafe,
            peft,
            fp32_modules,
            accumulate_grad_dtype,
            keep_batchnorm_fp32=keep_batchnorm_fp32,
            audio_preset=audio_preset,
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
        audio_preset: AudioPresetName | None = None,
    ) -> None:
        mode = flash_mode(precision, type(self).__name__)
        require_unaffected(FLASHOPTIM_DCP_CORRUPTION)  # its checkpoints would be corrupt: refuse before training
        self.precision = mode.name
        self._desired_input_dtype = mode.compute_dtype
        self.cast_model_kwargs = dict(cast_model_kwargs or {})
        self._init_checks(
            preserve_keys,
            on_unsafe,
            peft,
            fp32_modules,
            accumulate_grad_dtype,
            keep_batchnorm_fp32=keep_batchnorm_fp32,
            audio_preset=audio_preset,
        )

    @override
    def convert_module(self, module: Module) -> Module:
        """Cast a float32 model to the half dtype with :func:`flashoptim.cast_model`, except the ``fp32_modules``.

        Only float32 tensors are ever cast. A model handed over already holding other floating-point tensors (loaded
        in bf16, an fp64 buffer: dtypes the user chose) is left as it is, as NeMo's plugin leaves such modules, except
        that the ``fp32_modules`` are still made fp32; sharded (DTensor) parameters are left as the strategy stored
        them. :attr:`model_cast` says which happened, for the contract.

        Raises:
            PrecisionConfigError: If a parameter is stored in the other half dtype (e.g. bf16 under ``fp16-flash``):
                it would meet inputs cast to this plugin's dtype.
        """
        dtype = self._desired_input_dtype
        params = dict(module.named_parameters())
        other_half = [n for n, p in params.items() if p.dtype in HALF_DTYPES and p.dtype != dtype]
        if other_half:
            raise PrecisionConfigError(
                f"precision={self.precision!r} stores parameters in {dtype_name(dtype)}, but {len(other_half)} "
                f"parameters are {dtype_name(params[other_half[0]].dtype)} (e.g. {other_half[0]!r}). Load the model in "
                f"float32 or {dtype_name(dtype)}, or use the matching flash precision."
            )
        name = type(self).__name__
        sharded = [n for n, p in params.items() if isinstance(p, DTensor)]
        if sharded:
            self.model_cast = "left as the strategy sharded it (DTensor parameters)"
            info_rank_zero(
                f"{name}: {len(sharded)} parameters are sharded (DTensor); their storage dtype was set by the "
                "strategy and is left as is."
            )
            return module
        earlier = earlier_cast(module, dtype)
        if earlier is not None:  # a second fit of a model this library cast: nothing to do, nothing to warn
            self._convert_keeping_fp32(module, lambda m: None)
            self._add_cast_model_kept(module, earlier)
            self.model_cast = f"cast to {dtype_name(dtype)} by {name} before (an earlier fit); left as it is"
            info_rank_zero(f"{name}: the model was {self.model_cast}.")
            return module
        held = chosen_dtypes(module)
        if held:
            return self._leave_as_handed_over(module, held)
        before = {n: p.dtype for n, p in params.items()}
        by_cast_model: tuple[str, ...] = ()

        def cast(m: Module) -> None:
            nonlocal by_cast_model
            by_cast_model = cast_float32_model(m, dtype, self.cast_model_kwargs)

        self._convert_keeping_fp32(module, cast)
        self._add_cast_model_kept(module, by_cast_model)
        after = dict(module.named_parameters())
        cast_count = sum(1 for n, p in after.items() if before[n] != p.dtype)
        kept = len(after) - cast_count
        self.model_cast = f"float32 model cast to {dtype_name(dtype)} ({cast_count} parameters; {kept} kept in float32)"
        info_rank_zero(
            f"{name}: cast {cast_count} parameters to {dtype_name(dtype)}, {kept} kept in full precision "
            "(normalization layers / full_precision_layers / fp32_modules)."
        )
        return module

    def _add_cast_model_kept(self, module: Module, names: tuple[str, ...]) -> None:
        """List the modules ``flashoptim.cast_model`` kept fp32 beside the ``fp32_modules``, tagged, for the contract."""
        ours = self.fp32_module_names
        theirs = [n for n in names if not any(n == o or n.startswith(f"{o}.") for o in ours)]
        self.fp32_module_names = (*ours, *(f"{n}{CAST_MODEL_TAG}" for n in theirs))
        modules = dict(module.named_modules())
        self.fp32_module_objects = (*self.fp32_module_objects, *(modules[n] for n in theirs if n in modules))

    def _leave_as_handed_over(self, module: Module, held: dict[str, torch.dtype]) -> Module:
        """Keep the dtypes a model was handed over in (only the ``fp32_modules`` are made fp32), and say so."""
        dtype = self._desired_input_dtype
        self._convert_keeping_fp32(module, lambda m: None)
        self.model_cast = (
            f"left as handed over: the model already held non-float32 tensors ({describe_dtypes(held)}), so nothing "
            f"was cast to {dtype_name(dtype)}"
        )
        kept = {id(p) for m in self.fp32_module_objects for p in m.parameters()}
        off = {n: p.dtype for n, p in module.named_parameters() if p.dtype != dtype and id(p) not in kept}
        name = type(self).__name__
        if not off:
            info_rank_zero(f"{name}: {self.model_cast}.")
            return module
        first = next(iter(off))
        warn_once(
            f"flash-left-as-handed-over:{name}:{first}",
            f"{name}(precision={self.precision!r}) {self.model_cast}. {len(off)} parameters therefore stay "
            f"{dtype_name(off[first])}, not {dtype_name(dtype)} (e.g. {first!r}), while inputs are cast to "
            f"{dtype_name(dtype)}. Hand over the model all in float32 to have it cast, or all in {dtype_name(dtype)}.",
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
