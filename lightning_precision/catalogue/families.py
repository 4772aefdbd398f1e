"""Classifying an optimizer: any accepted spelling resolved to one spec, then the first family that knows it.

Adding an optimizer family is one entry in ``_FAMILIES`` (a test of the spec, and what it keeps) plus its tests.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from lightning_precision._imports import import_object
from lightning_precision._logging import info_rank_zero
from lightning_precision.catalogue.info import OptimizerInfo, OptimizerKind, UpdateFormula
from lightning_precision.dtypes import dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import expect_type, parse_bool, parse_number

_CONFIG_TARGET_KEYS = ("_target_", "class_path")
_ADAM_NAMES = ("adam", "lamb", "adan", "lion")  # optimizers with an EMA state; lion has only one moment


@dataclass(frozen=True)
class _Spec:
    """An optimizer as resolved from any spelling: its import path, class (if it imports here), settings, instance."""

    name: str
    cls: type | None
    settings: dict[str, Any]
    instance: Any

    @property
    def short(self) -> str:
        return self.name.lower().rsplit(".", 1)[-1]

    def declares(self, attr: str) -> bool:
        return bool(getattr(self.instance, attr, False) or getattr(self.cls, attr, False))

    def flag(self, key: str, *, default: bool = False) -> bool:
        """A boolean setting as a config writes it (``"false"`` is False, never truth-tested); ``None`` or absent:
        ``default``."""
        value = self.settings.get(key)
        return default if value is None else parse_bool(value, what=f"{self.name} {key}", spellings=True)

    def common(self) -> dict[str, Any]:
        """The fields every family fills the same way."""
        short = self.short
        is_adam = any(k in short for k in _ADAM_NAMES)
        if "lion" in short:
            moments: tuple[str, ...] = ("exp_avg",)
        elif is_adam:
            moments = ("exp_avg", "exp_avg_sq")
        else:
            moments = ("momentum_buffer",) if self.settings.get("momentum") else ()
        formula: UpdateFormula | None = "adam" if is_adam and "lion" not in short else None
        if (self.cls is not None and issubclass(self.cls, torch.optim.SGD)) or self.name.startswith("torch.optim.sgd"):
            formula = "sgd"
        return {
            "name": self.name,
            "is_adam": is_adam,
            "beta2": _beta2(self.name, self.settings),
            "moments": moments,
            "moment_dtypes": _moment_dtypes(self.name, self.settings, moments),
            "stochastic_moments": tuple(m for m in moments if self.settings.get(f"{m}_rounding") == "stochastic"),
            "update_formula": formula,
            "decoupled_weight_decay": short.endswith("adamw") or self.flag("decoupled_weight_decay"),
        }


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
    spec = _resolve(optimizer, kwargs)
    for matches, build in _FAMILIES:
        if matches(spec):
            return build(spec)
    return OptimizerInfo(
        kind=OptimizerKind.UNKNOWN,
        reason="not a known optimizer; it can declare keeps_master_weights or compensated_update",
        **spec.common(),
    )


def _resolve(optimizer: Any, kwargs: Mapping[str, Any] | None) -> _Spec:
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        settings = {**_signature_defaults(cls), **optimizer.defaults, **_instance_settings(optimizer)}
        return _Spec(_qualname(cls), cls, settings, optimizer)
    if isinstance(optimizer, Mapping):
        target = next((optimizer[k] for k in _CONFIG_TARGET_KEYS if k in optimizer), None)
        if target is None:
            raise PrecisionConfigError(
                f"optimizer config {dict(optimizer)!r} names no optimizer: give '_target_' (Hydra) or 'class_path' "
                "(LightningCLI)."
            )
        cfg_kwargs = (
            dict(optimizer.get("init_args") or {})
            if "class_path" in optimizer
            else {k: v for k, v in optimizer.items() if not (isinstance(k, str) and k.startswith("_"))}
        )
        return _resolve(target, {**cfg_kwargs, **(kwargs or {})})
    if isinstance(optimizer, str):
        cls = _locate(optimizer)
        if cls is None:
            return _Spec(optimizer, None, dict(kwargs or {}), None)
        optimizer = cls
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return _Spec(_qualname(optimizer), optimizer, {**_signature_defaults(optimizer), **dict(kwargs or {})}, None)
    raise PrecisionConfigError(
        f"Cannot classify optimizer {optimizer!r}: expected a torch.optim.Optimizer instance or class, an import path "
        "such as 'torch.optim.AdamW', or a config mapping with '_target_' or 'class_path'."
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _locate(path: str) -> type | None:
    """The class at ``path``; ``None`` only when its top-level package is not installed here (e.g. Transformer
    Engine on a CPU machine), so such a config is still classified by its path.

    Raises:
        PrecisionConfigError: If the package is installed but the path does not name an object in it (a typo such
            as ``"torch.optim.AdamWW"``): judging a name that does not exist would invent what it does; or if it
            names something that is not a class (``"os.system"``, the ``"torch.optim"`` module).
    """
    top = str(path).split(".", 1)[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return None
    try:
        obj = import_object(path, where="optimizer")
    except PrecisionConfigError:
        raise
    except Exception as err:  # the package's own import code failed here (a CUDA-only package on a CPU machine)
        info_rank_zero(
            f"optimizer {path!r}: importing it raised {type(err).__name__}: {err}; it is judged by its path alone."
        )
        return None
    if not isinstance(obj, type):
        # A function, builtin or module is not an optimizer: calling it "unknown" would pass it on to be run.
        raise PrecisionConfigError(
            f"optimizer {path!r} names {type(obj).__name__} {obj!r}, not an optimizer class: give a "
            "torch.optim.Optimizer subclass such as 'torch.optim.AdamW'."
        )
    return obj


def _signature_defaults(cls: type) -> dict[str, Any]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _instance_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Constructor options a live instance keeps outside ``defaults``.

    Many optimizers store keyword-only options as attributes (torchao's ``bf16_stochastic_round``, Transformer
    Engine's ``master_weights``), so an instance reads as its config would.
    """
    settings = {
        name: getattr(optimizer, name)
        for name in _signature_defaults(type(optimizer))
        if name not in optimizer.defaults and isinstance(getattr(optimizer, name, None), (bool, int, float, str))
    }
    groups = optimizer.param_groups
    if groups and "master_bytewidth" in groups[0]:  # flashoptim records it per group
        settings["master_bytewidth"] = max(g.get("master_bytewidth", 0) for g in groups)
    return settings


def _beta2(name: str, s: Mapping[str, Any]) -> float | None:
    # Read as numbers in [0, 1), never with float(): `betas: [0.9, abc]` is refused naming `abc`. A live torch
    # optimizer may hold tensor betas (capturable): those are read as their value.
    betas = s.get("betas") if s.get("beta2") is None else {"beta2": s["beta2"]}
    if isinstance(betas, (list, tuple)) and len(betas) >= 2:
        betas = {f"betas[{i}]": beta for i, beta in enumerate(betas)}
    if not isinstance(betas, dict):
        return None
    betas = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in betas.items()}
    read = [parse_number(v, what=f"{name} {k}", low=0, high=1, high_open=True) for k, v in betas.items()]
    return read[-1] if read else None


def _moment_dtypes(name: str, s: Mapping[str, Any], moments: tuple[str, ...]) -> tuple[tuple[str, torch.dtype], ...]:
    """Moment dtypes fixed by ``<moment>_dtype`` options (``CompensatedAdamW(exp_avg_dtype=...)``)."""
    fixed = []
    for moment in moments:
        value = parse_dtype(s.get(f"{moment}_dtype"), what=f"{name} {moment}_dtype")
        if value is not None:
            fixed.append((moment, value))
    return tuple(fixed)


# ---------------------------------------------------------------------------------------------------------------
# The families, in the order they are tried
# ---------------------------------------------------------------------------------------------------------------


def _declared_master(spec: _Spec) -> OptimizerInfo:
    return OptimizerInfo(kind=OptimizerKind.KEEPS_MASTER, reason="it declares keeps_master_weights", **spec.common())


def _declared_compensated(spec: _Spec) -> OptimizerInfo:
    check = getattr(spec.cls, "check_options", None)
    if spec.instance is None and callable(check):
        try:  # a config's options, with the optimizer's own rules: refused here, not at fit start
            check(spec.settings)
        except PrecisionConfigError as error:
            raise PrecisionConfigError(f"optimizer {spec.name}: {error}") from None
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


def _flashoptim(spec: _Spec) -> OptimizerInfo:
    s = spec.settings
    bits = 8 * int(s["master_bytewidth"] or 0) if "master_bytewidth" in s else int(s.get("master_weight_bits") or 0)
    common = {**spec.common(), "quantized_moments": spec.flag("quantize", default=True)}
    if bits:
        return OptimizerInfo(
            kind=OptimizerKind.KEEPS_MASTER,
            reason=f"flashoptim keeps {bits}-bit master weights through error-correction bits",
            master_bytes=(bits - 16) // 8,
            exp_avg_sq_dtype=torch.float32,
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


def _transformer_engine(spec: _Spec) -> OptimizerInfo:
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


def _optimi(spec: _Spec) -> OptimizerInfo:
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


def _torchao_stochastic(spec: _Spec) -> OptimizerInfo:
    low_bit = "8bit" in spec.short or "4bit" in spec.short
    return OptimizerInfo(
        kind=OptimizerKind.COMPENSATED,
        reason="torchao rounds bf16 parameter updates stochastically",
        exp_avg_sq_dtype=torch.uint8 if low_bit else None,
        step_temporaries=(0.0, 0.0),  # a per-tensor (compiled) step
        **spec.common(),
    )


def _any_precision_adamw(spec: _Spec) -> OptimizerInfo:
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


def _bitsandbytes(spec: _Spec) -> OptimizerInfo:
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


def _apex_fused_adam(spec: _Spec) -> OptimizerInfo:
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


def _state_follows_param(spec: _Spec) -> OptimizerInfo:
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


def _torch_subclass(spec: _Spec) -> OptimizerInfo:
    """A subclass of a torch optimizer that declares nothing keeps what its base keeps, as far as anyone can tell:
    judging it as unknown would let the trap through unwarned."""
    base = _qualname(_torch_base(spec.cls))  # type: ignore[arg-type]  # matched only when there is one
    info = _state_follows_param(replace(spec, name=base))
    return replace(
        info,
        name=spec.name,
        reason=f"it subclasses {base} and declares neither keeps_master_weights nor compensated_update, so it is "
        f"judged as its torch base: {info.reason}",
    )


def _prefix(*prefixes: str) -> Callable[[_Spec], bool]:
    return lambda spec: spec.name.lower().startswith(prefixes)


_FAMILIES: tuple[tuple[Callable[[_Spec], bool], Callable[[_Spec], OptimizerInfo]], ...] = (
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
