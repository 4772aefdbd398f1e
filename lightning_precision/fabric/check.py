"""The pairing check for Lightning Fabric loops: one call after ``fabric.setup``, the contract table on rank zero."""

from __future__ import annotations

from typing import Any

from lightning.fabric import Fabric
from torch.optim import Optimizer

from lightning_precision.fabric._checked import _FabricPairingCheck
from lightning_precision.fabric.fsdp2 import FSDP2Parallelize
from lightning_precision.grad_accumulation import accumulate_grad_dtype_of
from lightning_precision.modes import known_mode
from lightning_precision.pairing import Verdict
from lightning_precision.policy import OnUnsafe, PolicyHolder, check_and_enforce, optional_on_unsafe
from lightning_precision.report import build_contract, log_contract
from lightning_precision.values import parse_bool


def check(
    fabric: Fabric, *optimizers: Optimizer, on_unsafe: OnUnsafe | None = None, peft: bool | None = None
) -> list[Verdict]:
    """Judge the optimizers of a Fabric run by the pairing rule, act under ``on_unsafe`` and log the contract.

    Call it right after ``fabric.setup(model, optimizer)`` / ``fabric.setup_optimizers(...)``: the parameters are in
    their storage dtype (cast by the precision plugin, or sharded by
    :func:`~lightning_precision.fabric.fsdp2_parallelize`) and nothing has stepped. Every rank judges the same
    inputs, so under ``"error"`` every rank raises. Works with any Fabric precision, Lightning's own included
    (``Fabric(precision="bf16-true")``, as LitGPT configures it). This library's Fabric plugins then do not judge
    these optimizers again at their first step.

    Args:
        fabric: The Fabric object.
        *optimizers: The optimizers (as ``fabric.setup`` returned them, or plain).
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"``; ``None`` (default): the policy given to the precision
            plugin, else ``"warn"``. A policy given here also applies to the plugin's first-step check of optimizers
            not passed here.
        peft: Only adapters train: worded in the verdict only; the adapters are judged by their dtype. ``None``:
            the precision plugin's ``peft``, else ``False``.

    Returns:
        One verdict per optimizer, in order.

    Raises:
        PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        PrecisionConfigError: If ``on_unsafe`` is not a policy, or disagrees with the plugin's explicit one.
    """
    plugin = fabric.strategy.precision
    # Fabric keeps the parallelize_fn only privately; reading it tells the rule what "auto" storage decided.
    sharding = getattr(fabric.strategy, "_parallelize_fn", None)
    plan = sharding.plan if isinstance(sharding, FSDP2Parallelize) else None
    call = _CheckCall(optional_on_unsafe(on_unsafe, what="lightning_precision.fabric.check: on_unsafe"))
    policy = call.adopt_on_unsafe([plugin])
    if isinstance(plugin, PolicyHolder):
        plugin.adopt_on_unsafe([call])  # optimizers this call does not see follow it at their first step too
    if peft is None:
        peft = bool(getattr(plugin, "peft", False))
    peft = parse_bool(peft, what="lightning_precision.fabric.check: peft", spellings=True)
    raw = [_unwrap(o) for o in optimizers]
    mode = plan.mode if plan is not None else known_mode(getattr(plugin, "precision", None))
    where = "lightning_precision.fabric.check"
    verdicts = check_and_enforce(
        raw,
        on_unsafe=policy,
        peft=peft,
        where=where,
        storage_was_auto=plan.storage_was_auto if plan is not None else False,
        precision=mode,
    )
    if isinstance(plugin, _FabricPairingCheck):
        plugin.mark_judged(raw)
    contract = build_contract(
        plan.mode.name if plan is not None else str(getattr(plugin, "precision", "-")),  # FSDP2: what the plan is for
        raw,
        verdicts,
        compute_dtype=plan.compute_dtype if plan is not None else (mode.compute_dtype if mode else None),
        reduce_dtype=plan.reduce_dtype if plan is not None else None,
        fp32_modules=[*getattr(plugin, "fp32_module_names", ()), *(sharding.fp32_module_names if plan else ())],
        accumulate_grad_batches=None,  # the loop decides when to step
        accumulate_grad_dtype=accumulate_grad_dtype_of(plugin),
        parameters=getattr(plugin, "parameter_dtypes", ("-", "-")),
    )
    log_contract(contract, verdicts, on_unsafe=policy, where=where)
    return verdicts


class _CheckCall(PolicyHolder):
    """The ``on_unsafe`` given to one :func:`check` call, as a component whose policy the plugin's must agree with."""

    def __init__(self, on_unsafe: OnUnsafe | None) -> None:
        self._init_policy(on_unsafe)

    def explicit_on_unsafe(self) -> tuple[str, OnUnsafe] | None:
        return (
            ("lightning_precision.fabric.check(on_unsafe=...)", self.on_unsafe_given) if self.on_unsafe_given else None
        )


def _unwrap(optimizer: Any) -> Optimizer:
    # fabric.setup returns a _FabricOptimizer, which delegates to the optimizer it wraps (the one holding the state).
    return getattr(optimizer, "optimizer", optimizer)
