"""Classifying an optimizer: any accepted spelling resolved to one spec, then the first family that knows it.

Adding an optimizer family is one entry in ``_FAMILIES`` (a test of the spec, and what it keeps) plus its tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from lightning_precision.catalogue.info import OptimizerInfo, OptimizerKind
from lightning_precision.catalogue.spec import OptimizerSpec, qualname, resolve_spec
from lightning_precision.dtypes import dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import expect_type, parse_bool


def classify_optimizer(optimizer: Any, kwargs: Mapping[str, Any] | None = None) -> OptimizerInfo:
    """Classify an optimizer by what it keeps.

    Args:
        optimizer: An optimizer instance, an optimizer class, an import path such as ``"torch.optim.AdamW"``, or a
            config mapping with ``_target_`` (Hydra) or ``class_path``/``init_args`` (LightningCLI).
        kwargs: Constructor arguments when ``optimizer`` is a class or a path.

    Returns:
        The classification. An optimizer may declare itself with class or instance attributes
        ``keeps_master_weights = True`` or ``compensated_update = True``.

    Raises:
        PrecisionConfigError: If ``optimizer`` is none of the above, or a path that does not import.
        TypeError: If ``kwargs`` is not a mapping.
    """
    expect_type(kwargs, (Mapping, type(None)), what="classify_optimizer(kwargs=...)", expected="a mapping of arguments")
    spec = resolve_spec(optimizer, kwargs)
    for matches, build in _FAMILIES:
        if matches(spec):
            return build(spec)
    return OptimizerInfo(
        kind=OptimizerKind.UNKNOWN,
        reason="not a known optimizer; it can declare keeps_master_weights or compensated_update",
        **spec.common(),
    )


# ---------------------------------------------------------------------------------------------------------------
# The families, in the order they are tried
# ---------------------------------------------------------------------------------------------------------------


def _declared_master(spec: OptimizerSpec) -> OptimizerInfo:
    return OptimizerInfo(kind=OptimizerKind.KEEPS_MASTER, reason="it declares keeps_master_weights", **spec.common())


def _declared_compensated(spec: OptimizerSpec) -> OptimizerInfo:
    check = getattr(spec.cls, "check_options", None)
    if callable(check):
        try:  # a config's options, with the optimizer's own rules: refused here, not at fit start
            resolved = check(spec.settings)
        except PrecisionConfigError as error:
            raise PrecisionConfigError(f"optimizer {spec.name}: {error}") from None
        # The options as the optimizer will hold them (CompensatedAdamW's "auto" roundings resolved), if it says.
        spec = replace(spec, settings={**spec.settings, **(resolved or {})})
    sq = spec.settings.get("exp_avg_sq_dtype")
    # An optimizer may state its step's temporaries (CompensatedAdamW: the bound of its chunked step).
    declared = getattr(spec.instance, "step_temporaries", None) or getattr(spec.cls, "step_temporaries", None)
    temporaries = declared(spec.settings) if callable(declared) else declared
    return OptimizerInfo(
        kind=OptimizerKind.COMPENSATED,
        reason="it declares compensated_update",
        exp_avg_sq_dtype=parse_dtype(sq, what=f"{spec.name} exp_avg_sq_dtype") if sq is not None else None,
        compensation_buffer=True,
        step_temporaries=temporaries,
        **spec.common(),
    )


def _flashoptim(spec: OptimizerSpec) -> OptimizerInfo:
    s = spec.settings
    bits = 8 * int(s["master_bytewidth"] or 0) if "master_bytewidth" in s else int(s.get("master_weight_bits") or 0)
    quantized = spec.flag("quantize", default=True)
    common = {**spec.common(), "quantized_moments": quantized}
    if bits:
        return OptimizerInfo(
            kind=OptimizerKind.KEEPS_MASTER,
            reason=f"flashoptim keeps {bits}-bit master weights through error-correction bits",
            master_bytes=(bits - 16) // 8,
            # Quantized moments are int8 with fp16 scales, dequantized to fp32 for the step; unquantized ones are
            # stored in the parameter dtype (its _MaybeQuantizedTensor(storage_dtype=param.dtype)).
            exp_avg_sq_dtype=torch.float32 if quantized else None,
            **common,
        )
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM,
        reason="flashoptim with master_weight_bits=None keeps no master copy and its moments in the parameter dtype",
        **common,
    )


# Transformer Engine FusedAdam's documented defaults that decide what it keeps, for configs naming it on machines
# where it does not install (its signature cannot be read there).
_TE_DOCUMENTED_DEFAULTS: dict[str, Any] = {
    "exp_avg_dtype": torch.float32,
    "exp_avg_sq_dtype": torch.float32,
    "master_weight_dtype": torch.float32,
    "master_weights": False,
    "store_param_remainders": False,
}


def _transformer_engine(spec: OptimizerSpec) -> OptimizerInfo:
    """Transformer Engine ``FusedAdam``, from its documented signature (it does not install without CUDA).

    ``master_weights=True`` keeps a master copy in ``master_weight_dtype`` (fp32 by default); with
    ``store_param_remainders=True`` and bf16 parameters it keeps only the 16 low bits that, appended to the bf16
    parameter, rebuild the fp32 master (2 bytes instead of 4). Without ``master_weights`` the remainder option has no
    effect and updates are written in the parameter dtype. Its moments default to fp32 either way.
    """
    spec = replace(spec, settings={**_TE_DOCUMENTED_DEFAULTS, **spec.settings})
    s = spec.settings
    if not spec.flag("master_weights"):
        return OptimizerInfo(
            kind=OptimizerKind.STATE_FOLLOWS_PARAM,
            reason="Transformer Engine FusedAdam without master_weights writes updates in the parameter dtype"
            + (" (store_param_remainders needs master_weights=True)" if spec.flag("store_param_remainders") else ""),
            **spec.common(),
        )
    master = parse_dtype(s.get("master_weight_dtype"), what=f"{spec.name} master_weight_dtype") or torch.float32
    if master.itemsize < 4:  # a half master rounds the update as the half parameter would
        return OptimizerInfo(
            kind=OptimizerKind.STATE_FOLLOWS_PARAM,
            reason=f"Transformer Engine FusedAdam with master_weight_dtype={dtype_name(master)} keeps a half-precision "
            "master, which rounds small updates away as a half parameter does",
            **spec.common(),
        )
    remainders = spec.flag("store_param_remainders") and master == torch.float32
    return OptimizerInfo(
        kind=OptimizerKind.KEEPS_MASTER,
        reason=(
            "Transformer Engine FusedAdam with master_weights=True and store_param_remainders=True keeps the 16 low "
            "bits of an fp32 master next to each bf16 parameter"
            if remainders
            else f"Transformer Engine FusedAdam with master_weights=True keeps {dtype_name(master)} master weights"
        ),
        master_bytes=2 if remainders else master.itemsize,
        master_label="fp32 master remainders (16 low bits)" if remainders else f"{dtype_name(master)} master copy",
        exp_avg_sq_dtype=parse_dtype(s.get("exp_avg_sq_dtype") or torch.float32),
        **spec.common(),
    )


def _optimi(spec: OptimizerSpec) -> OptimizerInfo:
    common = {**spec.common()}
    if common["update_formula"] == "adam":
        common["update_formula"] = "adam-debiased"  # optimi keeps debiased moments
    common["decoupled_keys"] = ("decouple_wd", "decouple_lr")
    common["decoupled_weight_decay"] = any(spec.flag(k) for k in common["decoupled_keys"])
    common["step_temporaries"] = (0.0, 0.0)  # optimi's foreach step reuses the gradient buffers for temporaries
    if spec.settings.get("kahan_sum") is None or spec.flag("kahan_sum"):  # None means automatic: on for half params
        return OptimizerInfo(
            kind=OptimizerKind.COMPENSATED,
            reason="optimi applies Kahan summation to half-precision parameters",
            compensation_buffer=True,
            **common,
        )
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM, reason="optimi with kahan_sum=False writes plain updates", **common
    )


def _torchao_stochastic(spec: OptimizerSpec) -> OptimizerInfo:
    low_bit = "8bit" in spec.short or "4bit" in spec.short
    return OptimizerInfo(
        kind=OptimizerKind.COMPENSATED,
        reason="torchao rounds bf16 parameter updates stochastically",
        exp_avg_sq_dtype=torch.uint8 if low_bit else None,
        step_temporaries=(0.0, 0.0),  # a per-tensor (compiled) step
        **spec.common(),
    )


def _any_precision_adamw(spec: OptimizerSpec) -> OptimizerInfo:
    """torchdistx's AnyPrecisionAdamW: moments in ``momentum_dtype``/``variance_dtype`` for every parameter, and
    optional Kahan summation of the parameter write (``use_kahan_summation``, off by default)."""
    # Defaults from its documented signature, for configs read where the package is not installed.
    documented = {"betas": (0.9, 0.999), "momentum_dtype": torch.bfloat16, "variance_dtype": torch.bfloat16}
    spec = replace(spec, settings={**documented, **spec.settings})
    s = spec.settings
    fixed = []
    for moment, option in (("exp_avg", "momentum_dtype"), ("exp_avg_sq", "variance_dtype")):
        value = parse_dtype(s.get(option), what=f"{spec.name} {option}")
        if value is not None:
            fixed.append((moment, value))
    common = {**spec.common(), "moment_dtypes": tuple(fixed), "moment_dtypes_for_all": True}
    if spec.flag("use_kahan_summation"):
        return OptimizerInfo(
            kind=OptimizerKind.COMPENSATED,
            reason="AnyPrecisionAdamW with use_kahan_summation=True compensates the parameter write",
            compensation_buffer=True,
            **common,
        )
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM,
        reason="AnyPrecisionAdamW without use_kahan_summation writes its update into the parameter in place",
        **common,
    )


def _bitsandbytes(spec: OptimizerSpec) -> OptimizerInfo:
    """bitsandbytes optimizers update half parameters in place; 8-bit ones keep block-quantized uint8 moments."""
    eight_bit = "8bit" in spec.short or spec.settings.get("optim_bits") == 8
    common = spec.common()
    if eight_bit:
        common["moment_dtypes"] = tuple((m, torch.uint8) for m in common["moments"])
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM,
        reason="bitsandbytes writes the update into the half-precision parameter in place (no master copy)",
        exp_avg_sq_dtype=torch.uint8 if eight_bit else None,
        **common,
    )


def _apex_fused_adam(spec: OptimizerSpec) -> OptimizerInfo:
    """apex FusedAdam keeps fp32 moments for every parameter but writes bf16 parameters in place; its fp32 master
    copy (``master_weights``/``use_master``) covers fp16 parameters only, so half storage is judged unsafe."""
    common = {**spec.common(), "moment_dtypes": (("exp_avg", torch.float32),), "moment_dtypes_for_all": True}
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM,
        reason="apex FusedAdam writes bf16 parameters in place (its master copy, if enabled, is for fp16 parameters)",
        exp_avg_sq_dtype=torch.float32,
        **common,
    )


def _torch_step_temporaries(s: dict[str, Any]) -> tuple[float, float]:
    """torch's multi-tensor (foreach) step, its default on accelerators, allocates one copy of the parameters; the
    fused step and the per-tensor loop (``foreach=False``) allocate about nothing per parameter of the model."""
    fused, foreach = s.get("fused"), s.get("foreach")
    fused = fused is not None and parse_bool(fused, what="optimizer fused", spellings=True)
    foreach_off = foreach is not None and not parse_bool(foreach, what="optimizer foreach", spellings=True)
    return (0.0, 0.0) if fused or foreach_off else (1.0, 0.0)


def _state_follows_param(spec: OptimizerSpec) -> OptimizerInfo:
    torch_optim = spec.name.startswith("torch.optim.")
    default_step = spec.settings.get("foreach") is None and not spec.settings.get("fused")
    return OptimizerInfo(
        kind=OptimizerKind.STATE_FOLLOWS_PARAM,
        reason="it updates the stored parameter in place and creates its state in the parameter dtype",
        step_temporaries=_torch_step_temporaries(spec.settings) if torch_optim else None,
        step_temporaries_on_cpu=(0.0, 0.0) if torch_optim and default_step else None,
        **spec.common(),
    )


def _torch_base(cls: type | None) -> type | None:
    """The nearest ``torch.optim`` optimizer class that ``cls`` subclasses (not ``Optimizer`` itself), if any."""
    for base in inspect.getmro(cls)[1:] if cls is not None else ():
        if base.__module__.startswith("torch.optim.") and base is not torch.optim.Optimizer:
            return base
    return None


def _torch_subclass(spec: OptimizerSpec) -> OptimizerInfo:
    """A subclass of a torch optimizer that declares nothing keeps what its base keeps, as far as anyone can tell:
    judging it as unknown would let the trap through unwarned."""
    base = qualname(_torch_base(spec.cls))  # type: ignore[arg-type]  # matched only when there is one
    info = _state_follows_param(replace(spec, name=base))
    return replace(
        info,
        name=spec.name,
        reason=f"it subclasses {base} and declares neither keeps_master_weights nor compensated_update, so it is "
        f"judged as its torch base: {info.reason}",
    )


def _prefix(*prefixes: str) -> Callable[[OptimizerSpec], bool]:
    return lambda spec: spec.name.lower().startswith(prefixes)


_FAMILIES: tuple[tuple[Callable[[OptimizerSpec], bool], Callable[[OptimizerSpec], OptimizerInfo]], ...] = (
    (lambda spec: spec.declares("keeps_master_weights"), _declared_master),
    (lambda spec: spec.declares("compensated_update"), _declared_compensated),
    (_prefix("flashoptim."), _flashoptim),
    (lambda spec: _prefix("transformer_engine.")(spec) and "fusedadam" in spec.short, _transformer_engine),
    (_prefix("optimi."), _optimi),
    (lambda spec: _prefix("torchao.")(spec) and spec.flag("bf16_stochastic_round"), _torchao_stochastic),
    (lambda spec: spec.short == "anyprecisionadamw", _any_precision_adamw),
    (_prefix("bitsandbytes."), _bitsandbytes),
    (lambda spec: _prefix("apex.")(spec) and spec.short == "fusedadam", _apex_fused_adam),
    (_prefix("torch.optim.", "torchao."), _state_follows_param),
    (lambda spec: _torch_base(spec.cls) is not None, _torch_subclass),
)
