"""The pairing rule: which parameter storage dtype is safe with which optimizer.

This module is the only place that decides it; what each optimizer keeps comes from the optimizer catalogue
(:mod:`lightning_precision.catalogue`), what to do about an unsafe verdict from the policy
(:mod:`lightning_precision.policy`). The config helper, the plugins, the FSDP2 strategy, the runtime guard and the CLI
all ask it, so the rule cannot drift between them.

The rule in short: a ``torch.optim`` optimizer updates the stored parameter in place and creates its state in the
parameter's dtype, so half-precision storage makes its state and its updates half precision, and small updates
round away. Half storage is safe only with an optimizer that keeps its own master weights or error-correction
bits (flashoptim with ``master_weight_bits``, Transformer Engine ``FusedAdam(master_weights=True)``), or that
compensates the parameter write (Kahan summation, stochastic rounding). Frozen parameters are not judged; PEFT
adapters are trainable parameters like any other, judged by the dtype they are stored in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, get_args

import torch

from lightning_precision.catalogue import OptimizerInfo, OptimizerKind, classify_optimizer, observed_second_moment_dtype
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.modes import PrecisionMode
from lightning_precision.values import expect_type

_INFO_EXPECTED = "an OptimizerInfo (from classify_optimizer)"

Api = Literal["trainer", "fabric"]  # whose arguments a verdict's fixes name

# Where the rule's reasoning is written down for users: a command that prints the guide's section from the installed
# package (a docs/ path is not there after `pip install`); topics in lightning_precision.cli.docs.TOPICS.
GUIDE_TRAP = "see: lightning-precision docs trap"
GUIDE_RECIPES = "see: lightning-precision docs recipes"

# A second-moment EMA that changes by (1 - beta2) per step cannot move in bf16 once that is below half an ulp.
WEAK_SECOND_MOMENT_BETA2 = 0.99


class Status(str, Enum):
    """Outcome of judging a pairing."""

    SAFE = "safe"
    UNSAFE = "unsafe"  # half storage updated in place: the update rounds away
    WEAK_STATE = "weak optimizer state"  # update protected, but a half second moment cannot decay
    WASTEFUL = "safe, memory spent for nothing"  # fp32 storage for an optimizer that keeps its own master
    NOT_JUDGED = "not judged"  # storage dtype or optimizer not known yet
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
    precision: PrecisionMode | None = None,
    api: Api = "trainer",
) -> Verdict:
    """Judge a storage dtype / optimizer pairing. A pure function: same inputs, same verdict, on every rank.

    Args:
        storage_dtype: Dtype of the trainable parameters (``None``: unknown).
        optimizer: The classified optimizer (``None``: not known yet).
        peft: Whether only adapters train. It changes no verdict: the trainable parameters are judged by their
            dtype, adapters or not (bf16 adapters under torch AdamW are the trap too). It only words the verdict
            when the storage dtype is not known yet (a PEFT model keeps the dtype it was loaded in).
        num_params: Trainable parameter tensors in ``storage_dtype`` (for the message).
        num_elements: Their element count (for the message).
        exp_avg_sq_dtype: Observed second-moment dtype, if the optimizer has stepped.
        storage_was_auto: Whether ``storage_dtype`` was chosen by ``"auto"`` (then fp32 with a master-keeping
            optimizer is reported as wasteful).
        precision: The precision in effect, if known: the fix for an unsafe pairing is worded for it (under
            ``bf16-mixed`` the fix is loading the model in fp32, not choosing ``bf16-mixed``).
        api: Whose arguments the fixes name: ``"trainer"`` (``precision=``, ``FSDP2Strategy``, ``model.torch_dtype``)
            or ``"fabric"`` (``Fabric(precision=...)``, ``fsdp2_parallelize``, ``fabric.setup``).

    Returns:
        The verdict.

    Raises:
        TypeError: If ``storage_dtype``, ``optimizer`` or ``precision`` is not of its type (or ``None``).
        ValueError: If ``api`` is neither ``"trainer"`` nor ``"fabric"``.
    """
    if api not in get_args(Api):
        raise ValueError(f"judge(api={api!r}) is not valid. Choose one of: {', '.join(map(repr, get_args(Api)))}.")
    expect_type(storage_dtype, (torch.dtype, type(None)), what="judge(storage_dtype=...)", expected="a torch.dtype")
    expect_type(optimizer, (OptimizerInfo, type(None)), what="judge(optimizer=...)", expected=_INFO_EXPECTED)
    expect_type(precision, (PrecisionMode, type(None)), what="judge(precision=...)", expected="a PrecisionMode")
    common = {
        "storage_dtype": storage_dtype,
        "optimizer": optimizer,
        "num_params": num_params,
        "num_elements": num_elements,
    }
    opt_name = optimizer.name if optimizer else "unknown"
    if storage_dtype is None or optimizer is None:
        why = "storage dtype or optimizer not known yet"
        if peft and optimizer is not None:
            why = (
                "PEFT: the model keeps the dtype it was loaded in; the adapters are judged by their dtype when fit "
                "starts"
            )
        return Verdict(Status.NOT_JUDGED, why, cause=f"not-judged:{opt_name}", **common)
    half = storage_dtype in HALF_DTYPES
    kind = optimizer.kind
    if kind is OptimizerKind.UNKNOWN and not half:
        # Whatever it keeps, an optimizer writes its update into an fp32 parameter at fp32: nothing rounds away.
        return Verdict(
            Status.SAFE,
            f"{dtype_name(storage_dtype)} parameters take every update of {opt_name}; the dtypes of its state are not "
            "known to this library.",
            cause=f"safe:{opt_name}",
            **common,
        )
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
        # fp32 parameters are safe, but a second moment the optimizer keeps in half precision is not (e.g.
        # torchtitan-style bf16 optimizer states, AnyPrecisionAdamW's default variance_dtype).
        sq = exp_avg_sq_dtype or optimizer.state_dtype("exp_avg_sq", storage_dtype)
        if _second_moment_is_weak(optimizer, sq):
            return _weak_state_verdict(f"keeps {dtype_name(storage_dtype)} parameters", optimizer, sq, common)
        return Verdict(Status.SAFE, "", cause=f"safe:{opt_name}", **common)
    if kind is OptimizerKind.STATE_FOLLOWS_PARAM:
        return _unsafe_verdict(storage_dtype, optimizer, common, precision, api)
    sq = exp_avg_sq_dtype or optimizer.state_dtype("exp_avg_sq", storage_dtype)
    if kind is OptimizerKind.COMPENSATED and _second_moment_is_weak(optimizer, sq):
        return _weak_state_verdict(f"protects the {dtype_name(storage_dtype)} parameter update", optimizer, sq, common)
    return Verdict(Status.SAFE, "", cause=f"safe:{opt_name}", **common)


def _second_moment_is_weak(optimizer: OptimizerInfo, sq: torch.dtype | None) -> bool:
    """A half-precision EMA second moment with ``beta2`` above the threshold cannot decay (unless each write is
    rounded stochastically, which is unbiased)."""
    if "exp_avg_sq" in optimizer.stochastic_moments:
        return False
    keeps_one = "exp_avg_sq" in optimizer.moments or not optimizer.moments
    return optimizer.is_adam and keeps_one and sq in HALF_DTYPES and (optimizer.beta2 or 0.0) > WEAK_SECOND_MOMENT_BETA2


def _weak_state_verdict(what: str, optimizer: OptimizerInfo, sq: torch.dtype, common: dict[str, Any]) -> Verdict:
    return Verdict(
        Status.WEAK_STATE,
        f"{optimizer.short_name} {what}, but keeps exp_avg_sq in {dtype_name(sq)} with beta2={optimizer.beta2}: a "
        f"change of {1 - optimizer.beta2:.3g} per step is below half a {dtype_name(sq)} ulp, so the second moment cannot "
        f"decay and the step size drifts ({GUIDE_RECIPES}). Use beta2 <= {WEAK_SECOND_MOMENT_BETA2}, an fp32 second "
        "moment, or a bf16 one rounded stochastically (lightning_precision.optim.CompensatedAdamW's default: "
        "exp_avg_sq_rounding='auto' or 'stochastic').",
        cause=f"weak-state:{optimizer.name}:{dtype_name(sq)}:{optimizer.beta2}",
        **common,
    )


def _keep_fp32_fix(half: str, prefix: str, precision: PrecisionMode | None, api: Api) -> str:
    """Fix (1) of an unsafe pairing, fp32 storage with half compute, in the arguments of ``api``."""
    if precision is not None and precision.autocast:
        # The precision is already the fp32-storage one; the parameters were loaded (or cast) in half precision.
        if api == "fabric":
            return (
                f"keep {precision.name!r} with fp32 parameters: fsdp2_parallelize(storage_dtype='auto') when sharding, "
                f"else load the model in fp32 (model.float() before fabric.setup): autocast computes in {half} from "
                "fp32 parameters"
            )
        return (
            f"keep {precision.name!r} and load the model in fp32 (model.torch_dtype: float32, or model.float() before "
            f"fit): autocast computes in {half} from fp32 parameters"
        )
    if api == "fabric":
        return (
            f"keep fp32 storage with {half} compute: Fabric(precision='{prefix}-mixed') (or "
            f"lightning_precision.fabric.CheckedMixedPrecision) with the model loaded in fp32, and "
            f"fsdp2_parallelize('{prefix}-mixed', storage_dtype='auto') when sharding"
        )
    return (
        f"keep fp32 storage with {half} compute: precision='{prefix}-mixed', or "
        "FSDP2Strategy(storage_dtype='auto'), or model.torch_dtype: float32"
    )


def _unsafe_verdict(
    storage: torch.dtype, optimizer: OptimizerInfo, common: dict[str, Any], precision: PrecisionMode | None, api: Api
) -> Verdict:
    half = dtype_name(storage)
    prefix = "bf16" if storage == torch.bfloat16 else "16"
    flash = "bf16-flash" if storage == torch.bfloat16 else "fp16-flash"
    keep_fp32 = _keep_fp32_fix(half, prefix, precision, api)
    keep_half = (
        f"keep {half} storage with an optimizer that keeps master weights or error-correction bits "
        f"(flashoptim.FlashAdamW(master_weight_bits=24) with precision='{flash}', CUDA) or compensates its update "
        "(lightning_precision.optim.CompensatedAdamW)"
    )
    fixes = (keep_fp32, keep_half)
    count = f"{common['num_params']} trainable {half} parameter tensors ({common['num_elements']:,} elements)"
    if not common["num_params"]:
        count = f"trainable {half} parameters"
    half_moments = [m for m in optimizer.moments if optimizer.state_dtype(m, storage) == storage]
    if half_moments:
        state = f"its state ({', '.join(half_moments)}) is {half} and small"
    else:  # full-precision moments do not help when the update itself is written into the half parameter
        state = f"it writes each update into the {half} parameter in place, so small"
    message = (
        f"{count} are trained by {optimizer.name} ({optimizer.reason}): {state} updates round away, so long "
        f"full-parameter runs plateau at a higher loss ({GUIDE_TRAP}). Fix: (1) {fixes[0]}; or (2) {fixes[1]}. For a "
        f"short fine-tune where this is accepted, set on_unsafe='ignore'. For PEFT, keep the adapters in fp32 as PEFT "
        "creates them: HalfPrecisionForAudio does so by default (keep_trainable_fp32), or name them: "
        "fp32_modules=['*.lora_A.*', '*.lora_B.*']."
    )
    return Verdict(Status.UNSAFE, message, cause=f"unsafe:{optimizer.name}:{half}", fixes=fixes, **common)


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The distinct parameters of ``optimizer`` that train (DTensor shards included), in group order."""
    return list({id(p): p for group in optimizer.param_groups for p in group["params"] if p.requires_grad}.values())


def trainable_half_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters of ``optimizer`` that train and are stored in a half dtype (DTensor shards included)."""
    return [p for p in trainable_params(optimizer) if p.dtype in HALF_DTYPES]


def judged_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the rule looks at: the trainable half-precision ones if any, else every trainable one."""
    return trainable_half_params(optimizer) or trainable_params(optimizer)


def check_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    peft: bool = False,
    storage_was_auto: bool = False,
    precision: PrecisionMode | None = None,
    api: Api = "trainer",
) -> Verdict:
    """Judge a live optimizer and the parameters it updates.

    The storage dtype judged is that of the trainable half-precision parameters if there are any, otherwise of the
    first trainable parameter. Element counts use the global shape of DTensor shards, so every rank decides the
    same.

    Args:
        optimizer: The optimizer.
        peft: Whether only adapters train.
        storage_was_auto: Whether ``"auto"`` chose the storage dtype (see :func:`judge`).
        precision: The precision in effect, if known (see :func:`judge`).
        api: Whose arguments the fixes name (see :func:`judge`).

    Returns:
        The verdict.

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``.
    """
    expect_type(optimizer, torch.optim.Optimizer, what="check_optimizer(optimizer=...)", expected="a live optimizer")
    info = classify_optimizer(optimizer)
    half = trainable_half_params(optimizer)
    if half:
        storage = half[0].dtype
        judged = [p for p in half if p.dtype == storage]
    else:
        trainable = trainable_params(optimizer)
        storage = trainable[0].dtype if trainable else None
        judged = []
    return judge(
        storage,
        info,
        peft=peft,
        num_params=len(judged),
        num_elements=sum(p.numel() for p in judged),
        exp_avg_sq_dtype=observed_second_moment_dtype(optimizer, judged, info) if judged else None,
        storage_was_auto=storage_was_auto,
        precision=precision,
        api=api,
    )
