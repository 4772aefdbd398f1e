"""The pairing rule: which parameter storage dtype is safe with which optimizer.

This module is the only place that decides it. The config helper, the plugins, the FSDP2 strategy, the runtime
guard and the CLI all ask it, so the rule cannot drift between them.

The rule in short: a ``torch.optim`` optimizer updates the stored parameter in place and creates its state in the
parameter's dtype, so half-precision storage makes its state and its updates half precision, and small updates
round away. Half storage is safe only with an optimizer that keeps its own master weights or error-correction
bits (flashoptim with ``master_weight_bits``, Transformer Engine ``FusedAdam(master_weights=True)``), or that
compensates the parameter write (Kahan summation, stochastic rounding). Frozen parameters and PEFT adapters are
not judged.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch

from lightning_precision._imports import import_object
from lightning_precision._logging import info_once, warn_once
from lightning_precision.dtypes import HALF_DTYPES, dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError
from lightning_precision.modes import PrecisionMode, get_mode

OnUnsafe = Literal["warn", "error", "ignore"]
ON_UNSAFE_CHOICES: tuple[str, ...] = ("warn", "error", "ignore")

# A second-moment EMA that changes by (1 - beta2) per step cannot move in bf16 once that is below half an ulp.
WEAK_SECOND_MOMENT_BETA2 = 0.99


class OptimizerKind(str, Enum):
    """What an optimizer keeps, which decides whether half storage is safe with it."""

    STATE_FOLLOWS_PARAM = "state follows parameter dtype"
    KEEPS_MASTER = "keeps master weights / error-correction bits"
    COMPENSATED = "compensated parameter update"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer classified by what it really keeps.

    Attributes:
        name: Import path of the optimizer class, e.g. ``"torch.optim.adamw.AdamW"``.
        kind: What it keeps (see :class:`OptimizerKind`).
        reason: One sentence on why it was classified so.
        is_adam: Whether it is an Adam-family optimizer (has first and second moments).
        beta2: Second-moment decay, where known.
        exp_avg_sq_dtype: Dtype of the second moment if fixed by the optimizer, ``None`` if it follows the
            parameter dtype.
        master_bytes: Extra bytes per half-precision parameter it keeps for master weights or error correction.
        compensation_buffer: Whether it keeps a compensation buffer in the parameter dtype (Kahan summation).
    """

    name: str
    kind: OptimizerKind
    reason: str
    is_adam: bool = False
    beta2: float | None = None
    exp_avg_sq_dtype: torch.dtype | None = None
    master_bytes: int = 0
    compensation_buffer: bool = False

    @property
    def short_name(self) -> str:
        """Class name without the module path."""
        return self.name.rsplit(".", 1)[-1]


class Status(str, Enum):
    """Outcome of judging a pairing."""

    SAFE = "safe"
    UNSAFE = "unsafe"  # half storage updated in place: the update rounds away
    WEAK_STATE = "weak optimizer state"  # update protected, but a half second moment cannot decay
    WASTEFUL = "safe, memory spent for nothing"  # fp32 storage for an optimizer that keeps its own master
    NOT_JUDGED = "not judged"  # nothing trainable in half precision that the rule applies to, or PEFT
    UNKNOWN = "unknown optimizer"


@dataclass(frozen=True)
class Verdict:
    """The judgement of one storage dtype / optimizer pairing.

    Attributes:
        status: The outcome.
        message: What is wrong and how to fix it (empty when there is nothing to say).
        cause: Key that identifies the cause, used to warn once per cause.
        storage_dtype: Storage dtype of the judged trainable parameters.
        optimizer: The classified optimizer.
        num_params: Trainable half-precision parameter tensors judged.
        num_elements: Their element count.
    """

    status: Status
    message: str
    cause: str
    storage_dtype: torch.dtype | None
    optimizer: OptimizerInfo | None
    num_params: int = 0
    num_elements: int = 0
    fixes: tuple[str, ...] = field(default=())

    @property
    def is_unsafe(self) -> bool:
        """Whether the pairing loses updates (the trap)."""
        return self.status is Status.UNSAFE


# ---------------------------------------------------------------------------------------------------------------
# Classifying optimizers
# ---------------------------------------------------------------------------------------------------------------

_CONFIG_TARGET_KEYS = ("_target_", "class_path")
_ADAM_NAMES = ("adam", "lamb", "adan", "lion")  # optimizers with an EMA state; lion has only one moment


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
        PrecisionConfigError: If ``optimizer`` is none of the above.
    """
    return _classify(*_resolve(optimizer, kwargs))


def optimizer_settings(optimizer: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings the rule reads: the class's constructor defaults under the config's (or instance's) values.

    Takes the same inputs as :func:`classify_optimizer`; only the config's own arguments when the class does not
    import here.
    """
    return _resolve(optimizer, kwargs)[2]


def _resolve(optimizer: Any, kwargs: Mapping[str, Any] | None) -> tuple[str, type | None, dict[str, Any], Any]:
    """``(import path, class or None, settings, instance or None)`` for any accepted optimizer spelling."""
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        settings = {**_signature_defaults(cls), **optimizer.defaults, **_instance_settings(optimizer)}
        return _qualname(cls), cls, settings, optimizer
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
            return optimizer, None, dict(kwargs or {}), None
        optimizer = cls
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return _qualname(optimizer), optimizer, {**_signature_defaults(optimizer), **dict(kwargs or {})}, None
    raise PrecisionConfigError(
        f"Cannot classify optimizer {optimizer!r}: expected a torch.optim.Optimizer instance or class, an import path "
        "such as 'torch.optim.AdamW', or a config mapping with '_target_' or 'class_path'."
    )


def _classify(name: str, cls: type | None, s: dict[str, Any], instance: Any) -> OptimizerInfo:
    lname = name.lower()
    short = lname.rsplit(".", 1)[-1]
    is_adam = any(k in short for k in _ADAM_NAMES)
    beta2 = _beta2(s)
    common = {"name": name, "is_adam": is_adam, "beta2": beta2}

    declared_master = _declared(cls, instance, "keeps_master_weights")
    declared_comp = _declared(cls, instance, "compensated_update")
    if declared_master:
        return OptimizerInfo(kind=OptimizerKind.KEEPS_MASTER, reason="it declares keeps_master_weights", **common)
    if declared_comp:
        sq = s.get("exp_avg_sq_dtype")
        return OptimizerInfo(
            kind=OptimizerKind.COMPENSATED,
            reason="it declares compensated_update",
            exp_avg_sq_dtype=parse_dtype(sq, what=f"{name} exp_avg_sq_dtype") if sq is not None else None,
            compensation_buffer=True,
            **common,
        )
    if lname.startswith("flashoptim."):
        bits = _flash_master_bits(s)
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
    if lname.startswith("transformer_engine.") and "fusedadam" in short:
        if s.get("master_weights"):
            return OptimizerInfo(
                kind=OptimizerKind.KEEPS_MASTER,
                reason="Transformer Engine FusedAdam with master_weights=True keeps fp32 master weights",
                master_bytes=4,
                exp_avg_sq_dtype=parse_dtype(s.get("exp_avg_sq_dtype") or torch.float32),
                **common,
            )
        return OptimizerInfo(
            kind=OptimizerKind.STATE_FOLLOWS_PARAM,
            reason="Transformer Engine FusedAdam without master_weights writes updates in the parameter dtype",
            **common,
        )
    if lname.startswith("optimi."):
        if s.get("kahan_sum", None) is not False:  # None means automatic: on for half parameters
            return OptimizerInfo(
                kind=OptimizerKind.COMPENSATED,
                reason="optimi applies Kahan summation to half-precision parameters",
                compensation_buffer=True,
                **common,
            )
        return OptimizerInfo(
            kind=OptimizerKind.STATE_FOLLOWS_PARAM, reason="optimi with kahan_sum=False writes plain updates", **common
        )
    if lname.startswith("torchao.") and s.get("bf16_stochastic_round"):
        return OptimizerInfo(
            kind=OptimizerKind.COMPENSATED,
            reason="torchao rounds bf16 parameter updates stochastically",
            exp_avg_sq_dtype=None if "8bit" not in short and "4bit" not in short else torch.uint8,
            **common,
        )
    if lname.startswith(("torch.optim.", "torchao.")):
        return OptimizerInfo(
            kind=OptimizerKind.STATE_FOLLOWS_PARAM,
            reason="it updates the stored parameter in place and creates its state in the parameter dtype",
            **common,
        )
    return OptimizerInfo(
        kind=OptimizerKind.UNKNOWN,
        reason="not a known optimizer; it can declare keeps_master_weights or compensated_update",
        **common,
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _locate(path: str) -> type | None:
    """The class at ``path``; ``None`` only when its top-level package is not installed here (e.g. Transformer
    Engine on a CPU machine), so such a config is still classified by its path.

    Raises:
        PrecisionConfigError: If the package is installed but the path does not name an object in it (a typo such
            as ``"torch.optim.AdamWW"``): judging a name that does not exist would invent what it does.
    """
    top = str(path).split(".", 1)[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return None
    obj = import_object(path, where="optimizer")
    return obj if isinstance(obj, type) else None


def _signature_defaults(cls: type) -> dict[str, Any]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _instance_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    settings = {}
    if hasattr(optimizer, "master_weights"):  # Transformer Engine FusedAdam
        settings["master_weights"] = bool(optimizer.master_weights)
    groups = optimizer.param_groups
    if groups and "master_bytewidth" in groups[0]:  # flashoptim records it per group
        settings["master_bytewidth"] = max(g.get("master_bytewidth", 0) for g in groups)
    return settings


def _declared(cls: type | None, instance: Any, attr: str) -> bool:
    return bool(getattr(instance, attr, False) or getattr(cls, attr, False))


def _flash_master_bits(s: Mapping[str, Any]) -> int:
    if "master_bytewidth" in s:  # a live flashoptim instance records the master width in bytes
        return 8 * int(s["master_bytewidth"] or 0)
    return int(s.get("master_weight_bits") or 0)


def _beta2(s: Mapping[str, Any]) -> float | None:
    if "beta2" in s and s["beta2"] is not None:
        return float(s["beta2"])
    betas = s.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) >= 2:
        return float(betas[1])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Resolving the storage dtype before the model exists
# ---------------------------------------------------------------------------------------------------------------


def _cfg_get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def resolve_storage_dtype(
    model_cfg: Any,
    optimizer_cfg: Any,
    peft: bool = False,
    precision: str | PrecisionMode | None = None,
) -> torch.dtype | None:
    """Decide the storage dtype of the trainable parameters from the configs.

    Reads ``model_cfg.torch_dtype`` (dict or OmegaConf, struct mode too; never modified).

    * An explicit dtype is honoured (it must agree with a precision that forces storage).
    * A precision that casts the module (``*-true``, ``*-flash``) sets storage to its half dtype.
    * Otherwise PEFT runs are left alone: returns ``None`` (the base weights are frozen).
    * Otherwise (unset or ``"auto"``): ``float32`` for optimizers whose state follows the parameter dtype, and for
      unknown ones (the safe choice); the precision's half dtype (bf16 by default) for optimizers that keep their
      own master weights or compensate their update.

    Args:
        model_cfg: The model section (may be ``None``).
        optimizer_cfg: The optimizer section, class, path or instance (may be ``None``: treated as unknown).
        peft: Whether only adapters train.
        precision: The trainer's precision string or mode, if known.

    Returns:
        The storage dtype, or ``None`` when it is left to the model (PEFT).

    Raises:
        PrecisionConfigError: If ``torch_dtype`` is not a dtype, or contradicts the precision.
    """
    mode = get_mode(precision) if isinstance(precision, (str, int)) else precision
    explicit = parse_dtype(_cfg_get(model_cfg, "torch_dtype"), what="model.torch_dtype")
    if explicit is not None:
        if mode is not None and mode.storage_dtype is not None and explicit != mode.storage_dtype:
            raise PrecisionConfigError(
                f"model.torch_dtype={dtype_name(explicit)} contradicts precision={mode.name!r}, which stores "
                f"parameters in {dtype_name(mode.storage_dtype)}. Use torch_dtype: {dtype_name(mode.storage_dtype)} "
                f"or auto, or a '*-mixed' precision for {dtype_name(explicit)} storage with half compute."
            )
        return explicit
    if mode is not None and mode.storage_dtype is not None:
        return mode.storage_dtype
    if peft:
        return None
    info = classify_optimizer(optimizer_cfg) if optimizer_cfg is not None else None
    if info is not None and info.kind in (OptimizerKind.KEEPS_MASTER, OptimizerKind.COMPENSATED):
        return (mode.half_dtype if mode is not None else None) or torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Judging a pairing
# ---------------------------------------------------------------------------------------------------------------


def judge(
    storage_dtype: torch.dtype | None,
    optimizer: OptimizerInfo | None,
    *,
    peft: bool = False,
    num_params: int = 0,
    num_elements: int = 0,
    exp_avg_sq_dtype: torch.dtype | None = None,
    storage_was_auto: bool = False,
) -> Verdict:
    """Judge a storage dtype / optimizer pairing. A pure function: same inputs, same verdict, on every rank.

    Args:
        storage_dtype: Dtype of the trainable parameters (``None``: unknown).
        optimizer: The classified optimizer (``None``: not known yet).
        peft: Whether only adapters train; such runs are not judged.
        num_params: Trainable parameter tensors in ``storage_dtype`` (for the message).
        num_elements: Their element count (for the message).
        exp_avg_sq_dtype: Observed second-moment dtype, if the optimizer has stepped.
        storage_was_auto: Whether ``storage_dtype`` was chosen by ``"auto"`` (then fp32 with a master-keeping
            optimizer is reported as wasteful).

    Returns:
        The verdict.
    """
    common = {
        "storage_dtype": storage_dtype,
        "optimizer": optimizer,
        "num_params": num_params,
        "num_elements": num_elements,
    }
    opt_name = optimizer.name if optimizer else "unknown"
    if peft or storage_dtype is None or optimizer is None:
        why = "PEFT run: only adapters train" if peft else "storage dtype or optimizer not known yet"
        return Verdict(Status.NOT_JUDGED, why, cause=f"not-judged:{opt_name}", **common)
    half = storage_dtype in HALF_DTYPES
    kind = optimizer.kind
    if kind is OptimizerKind.UNKNOWN:
        return Verdict(
            Status.UNKNOWN,
            f"{opt_name} is not known to this library; {optimizer.reason}.",
            cause=f"unknown:{opt_name}",
            **common,
        )
    if not half:
        if storage_was_auto and kind is OptimizerKind.KEEPS_MASTER:
            return Verdict(
                Status.WASTEFUL,
                f"storage was resolved to {dtype_name(storage_dtype)}, but {optimizer.short_name} keeps its own master "
                f"weights: half storage would be as accurate and use less memory (set storage_dtype/torch_dtype to "
                f"bfloat16).",
                cause=f"wasteful:{opt_name}",
                **common,
            )
        return Verdict(Status.SAFE, "", cause=f"safe:{opt_name}", **common)
    if kind is OptimizerKind.STATE_FOLLOWS_PARAM:
        return _unsafe_verdict(storage_dtype, optimizer, common)
    sq = exp_avg_sq_dtype or optimizer.exp_avg_sq_dtype or storage_dtype
    if (
        kind is OptimizerKind.COMPENSATED
        and optimizer.is_adam
        and sq in HALF_DTYPES
        and (optimizer.beta2 or 0.0) > WEAK_SECOND_MOMENT_BETA2
    ):
        return Verdict(
            Status.WEAK_STATE,
            f"{optimizer.short_name} protects the {dtype_name(storage_dtype)} parameter update, but keeps exp_avg_sq in "
            f"{dtype_name(sq)} with beta2={optimizer.beta2}: a change of {1 - optimizer.beta2:.3g} per step is below half "
            f"a {dtype_name(sq)} ulp, so the second moment cannot decay (benchmarks/compensated_adamw.py, teacher task: 1.06x the fp32 "
            f"reference's final loss with a {dtype_name(sq)} second moment, 1.00x with an fp32 one). Use beta2 <= "
            f"{WEAK_SECOND_MOMENT_BETA2} or an fp32 second moment (lightning_precision.optim.CompensatedAdamW keeps one).",
            cause=f"weak-state:{opt_name}:{dtype_name(sq)}:{optimizer.beta2}",
            **common,
        )
    return Verdict(Status.SAFE, "", cause=f"safe:{opt_name}", **common)


def _unsafe_verdict(storage: torch.dtype, optimizer: OptimizerInfo, common: dict[str, Any]) -> Verdict:
    half = dtype_name(storage)
    prefix = "bf16" if storage == torch.bfloat16 else "16"
    flash = "bf16-flash" if storage == torch.bfloat16 else "fp16-flash"
    keep_fp32 = (
        f"keep fp32 storage with {half} compute: precision='{prefix}-mixed', or FSDP2Strategy(storage_dtype='auto'), "
        "or model.torch_dtype: float32"
    )
    keep_half = (
        f"keep {half} storage with an optimizer that keeps master weights or error-correction bits "
        f"(flashoptim.FlashAdamW(master_weight_bits=24) with precision='{flash}', CUDA) or compensates its update "
        "(lightning_precision.optim.CompensatedAdamW)"
    )
    fixes = (keep_fp32, keep_half)
    count = f"{common['num_params']} trainable {half} parameter tensors ({common['num_elements']:,} elements)"
    if not common["num_params"]:
        count = f"trainable {half} parameters"
    message = (
        f"{count} are trained by {optimizer.name} ({optimizer.reason}): its state "
        f"(exp_avg, exp_avg_sq) is {half} and small updates round away, so long full-parameter runs plateau at a "
        f"higher loss. Fix: (1) {fixes[0]}; or (2) {fixes[1]}. For a short fine-tune where this is accepted, set "
        f"on_unsafe='ignore'; PEFT runs are not judged (peft=True)."
    )
    return Verdict(Status.UNSAFE, message, cause=f"unsafe:{optimizer.name}:{half}", fixes=fixes, **common)


def trainable_half_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters of ``optimizer`` that train and are stored in a half dtype (DTensor shards included)."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p.dtype in HALF_DTYPES and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def observed_exp_avg_sq_dtype(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The dtype of the second moment the optimizer really keeps for ``params``, once it has stepped."""
    for p in params:
        state = optimizer.state.get(p, {})
        for key in ("exp_avg_sq", "exp_avg"):  # single-moment optimizers: judge what they keep
            value = state.get(key)
            value = getattr(value, "data", value)  # flashoptim wraps state tensors
            if isinstance(value, torch.Tensor):
                return value.dtype
    return None


def check_optimizer(optimizer: torch.optim.Optimizer, *, peft: bool = False, storage_was_auto: bool = False) -> Verdict:
    """Judge a live optimizer and the parameters it updates.

    The storage dtype judged is that of the trainable half-precision parameters if there are any, otherwise of the
    first trainable parameter. Element counts use the global shape of DTensor shards, so every rank decides the
    same.

    Args:
        optimizer: The optimizer.
        peft: Whether only adapters train.
        storage_was_auto: Whether ``"auto"`` chose the storage dtype (see :func:`judge`).

    Returns:
        The verdict.
    """
    info = classify_optimizer(optimizer)
    half = trainable_half_params(optimizer)
    if half:
        storage = half[0].dtype
        judged = [p for p in half if p.dtype == storage]
    else:
        trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        storage = trainable[0].dtype if trainable else None
        judged = []
    return judge(
        storage,
        info,
        peft=peft,
        num_params=len(judged),
        num_elements=sum(p.numel() for p in judged),
        exp_avg_sq_dtype=observed_exp_avg_sq_dtype(optimizer, judged),
        storage_was_auto=storage_was_auto,
    )


def validate_on_unsafe(value: Any, *, what: str = "on_unsafe") -> OnUnsafe:
    """Check an ``on_unsafe`` policy value.

    Raises:
        PrecisionConfigError: If it is not one of ``"warn"``, ``"error"``, ``"ignore"``.
    """
    if value not in ON_UNSAFE_CHOICES:
        raise PrecisionConfigError(f"{what}={value!r} is not valid. Choose one of: {', '.join(ON_UNSAFE_CHOICES)}.")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Acting on a verdict
# ---------------------------------------------------------------------------------------------------------------


def enforce(verdict: Verdict, on_unsafe: OnUnsafe = "warn", *, where: str = "") -> Verdict:
    """Act on a verdict under an ``on_unsafe`` policy.

    An unsafe pairing raises :class:`PrecisionPairingError` under ``"error"`` (on every rank, since every rank
    judges the same inputs), emits a :class:`PrecisionWarning` under ``"warn"``, and is silent under ``"ignore"``.
    A weak second moment is a warning of its own unless ``"ignore"``. Wasteful or unknown pairings are logged.
    Warnings and log lines appear once per cause per process, on rank zero only.

    Args:
        verdict: What :func:`judge` or :func:`check_optimizer` said.
        on_unsafe: The policy.
        where: Where the pairing was seen (e.g. ``"config"``, ``"fit start"``), prefixed to the message.

    Returns:
        The verdict, for chaining.

    Raises:
        PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        PrecisionConfigError: If ``on_unsafe`` is not a valid policy.
    """
    validate_on_unsafe(on_unsafe)
    prefix = f"[{where}] " if where else ""
    if on_unsafe == "ignore" and verdict.status in (Status.UNSAFE, Status.WEAK_STATE):
        return verdict
    if verdict.status is Status.UNSAFE and on_unsafe == "error":
        raise PrecisionPairingError(f"{prefix}{verdict.message} (raised because on_unsafe='error')")
    if verdict.status in (Status.UNSAFE, Status.WEAK_STATE):
        warn_once(verdict.cause, f"{prefix}{verdict.message}")
    elif verdict.status in (Status.WASTEFUL, Status.UNKNOWN):
        info_once(verdict.cause, f"{prefix}{verdict.message}")
    return verdict


def check_and_enforce(
    optimizers: Iterable[torch.optim.Optimizer],
    *,
    on_unsafe: OnUnsafe = "warn",
    peft: bool = False,
    where: str = "",
    storage_was_auto: bool = False,
) -> list[Verdict]:
    """Judge each live optimizer with :func:`check_optimizer` and act on it with :func:`enforce`."""
    return [
        enforce(check_optimizer(opt, peft=peft, storage_was_auto=storage_was_auto), on_unsafe, where=where)
        for opt in optimizers
    ]
