"""The precision contract of a run as data: what each dtype is, and whether the pairing is safe.

The runtime guard fills it from the live trainer; the CLI's ``explain`` fills it from a config. Both print it with
:meth:`PrecisionContract.format_table` and store it with :meth:`PrecisionContract.to_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lightning_precision._logging import info_once, info_rank_zero, warn_once
from lightning_precision.catalogue import OptimizerInfo, OptimizerKind, classify_optimizer, observed_moment_dtypes
from lightning_precision.dtypes import dtype_name
from lightning_precision.grad_accumulation import accumulate_grad_dtype_of, accumulation_dtype, describe_accumulation
from lightning_precision.modes import known_mode
from lightning_precision.pairing import Status, Verdict, judged_params, trainable_params
from lightning_precision.values import PATH_TYPES, expect_type

CHECKPOINT_KEY = "precision_contract"  # where the runtime guard stores the contract in a checkpoint


@dataclass
class OptimizerContract:
    """One optimizer's line of the contract.

    Attributes:
        optimizer: Import path of the optimizer class.
        storage_dtype: Dtype of the trainable parameters it updates.
        state_dtype: Dtype of its moments (``exp_avg`` / ``exp_avg_sq``); ``observed`` says whether it was read from
            the live state after a step or predicted from the rule.
        master_weights: What protects the parameter update (``"no"``, ``"fp32 master"``, ...).
        verdict: The pairing rule's status.
        message: The rule's explanation, if any.
        also_updates: The trainable parameters it updates in other dtypes than ``storage_dtype`` (modules kept in
            fp32, normalization layers ``flashoptim.cast_model`` keeps), with their state: ``"4 float32 tensors
            (40 elements), state float32"``; empty when there are none. Contracts written before this field read back
            empty.
    """

    optimizer: str
    storage_dtype: str
    state_dtype: str
    master_weights: str
    verdict: str
    message: str = ""
    observed: bool = False
    also_updates: str = ""


@dataclass
class PrecisionContract:
    """The precision contract of a run.

    Attributes:
        precision: The precision string in effect.
        compute_dtype: Dtype of forward/backward math.
        reduce_dtype: Dtype of gradient reduction across ranks (``"-"`` if not distributed / not set).
        optimizers: One line per optimizer.
        measured: The latest stale-update fractions of an ``UpdateUnderflowMonitor`` running alongside the guard,
            by metric name (empty without one, or before its first measurement).
        fp32_modules: Submodules, and parameters or buffers named, that the precision plugin or strategy keeps in
            fp32 (``fp32_modules=...``, BatchNorm layers, the modules of trainable adapters).
        accumulate_grad_batches: Micro-batches whose gradients are summed into each optimizer step (``None``: a
            Fabric loop, which decides that itself).
        grad_accumulation_dtype: Dtype of that sum for the judged parameters: the storage dtype (autograd's
            ``param.grad``, FSDP2's sharded gradient), or float32 with ``accumulate_grad_dtype="float32"``; ``"-"``
            when not known. Contracts written before these fields existed read back as 1 micro-batch, ``"-"``.
        model_cast: What the precision plugin did to the dtypes the model was handed over in (``FlashPrecision``:
            a float32 model cast, or a model that already held other dtypes left as it was); empty when not
            reported.
        trainable_dtypes: Dtypes of the model's trainable parameters, most elements first (``"float32 / bfloat16"``
            when mixed); ``"-"`` when not known (a config, or a Fabric run without this library's plugin).
        frozen_dtypes: The same for its frozen (``requires_grad=False``) parameters: ``"-"`` when none or not known.
    """

    precision: str
    compute_dtype: str
    reduce_dtype: str = "-"
    optimizers: list[OptimizerContract] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)
    fp32_modules: list[str] = field(default_factory=list)
    accumulate_grad_batches: int | None = 1
    grad_accumulation_dtype: str = "-"
    model_cast: str = ""
    trainable_dtypes: str = "-"
    frozen_dtypes: str = "-"

    @property
    def accumulation_text(self) -> str:
        """``"16 micro-batches summed in bfloat16"`` (``"1 micro-batch (no accumulation)"``)."""
        return describe_accumulation(self.accumulate_grad_batches, self.grad_accumulation_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON, hyperparameters and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionContract:
        """Read back what :meth:`to_dict` wrote.

        Raises:
            TypeError: If ``data`` is not a mapping.
        """
        expect_type(data, Mapping, what="PrecisionContract.from_dict(data=...)", expected="a mapping (from to_dict)")
        rows = data.get("optimizers", [])
        expect_type(rows, list, what="PrecisionContract.from_dict(data['optimizers'])", expected="a list of rows")
        for i, row in enumerate(rows):
            expect_type(row, Mapping, what=f"PrecisionContract.from_dict(data['optimizers'][{i}])", expected="a row")
        return cls(**{**data, "optimizers": [OptimizerContract(**row) for row in rows]})

    def format_table(self) -> str:
        """A short human-readable table, one row per optimizer."""
        head = ("optimizer", "storage", "compute", "reduce", "optimizer state", "master weights", "verdict")
        rows = [
            (
                o.optimizer.rsplit(".", 1)[-1],
                o.storage_dtype,
                self.compute_dtype,
                self.reduce_dtype,
                o.state_dtype + ("" if o.observed else " (predicted)"),
                o.master_weights,
                o.verdict,
            )
            for o in self.optimizers
        ]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
        title = f"Precision contract (precision={self.precision})"
        kept = [f"kept in fp32: {_first_names(self.fp32_modules)}"] if self.fp32_modules else []
        kept += [
            f"{o.optimizer.rsplit('.', 1)[-1]} also updates {o.also_updates}" for o in self.optimizers if o.also_updates
        ]
        kept += [f"model dtypes: {self.model_cast}"] if self.model_cast else []
        split = self.frozen_dtypes != "-"  # only a model with frozen parameters has two storage dtypes to tell apart
        params = [f"parameters: trainable {self.trainable_dtypes}, frozen {self.frozen_dtypes}"] if split else []
        micro = self.accumulate_grad_batches
        storage = self.optimizers[0].storage_dtype if self.optimizers else None
        buffered = storage is not None and self.grad_accumulation_dtype not in ("-", storage)  # fp32 buffers
        # Named when micro-batches are summed, or when a Fabric loop (which decides that itself) has fp32 buffers.
        shown = (micro is not None and micro > 1) or (micro is None and buffered)
        accumulation = [f"gradient accumulation: {self.accumulation_text}"] if shown else []
        return "\n".join(
            [title, line(head), line(["-" * w for w in widths]), *map(line, rows), *params, *kept, *accumulation]
        )


def _first_names(names: Sequence[str], shown: int = 8) -> str:
    """``a, b, c`` or, for a long list (every adapter of a LoRA model), the first few and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def parameter_dtypes(model: torch.nn.Module) -> tuple[str, str]:
    """The dtypes of the trainable and of the frozen parameters of ``model``, most elements first (``"-"``: none)."""
    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for param in model.parameters():
        side = counts[0 if param.requires_grad else 1]
        side[dtype_name(param.dtype)] = side.get(dtype_name(param.dtype), 0) + param.numel()
    text = lambda c: " / ".join(sorted(c, key=lambda d: -c[d])) or "-"
    return text(counts[0]), text(counts[1])


def describe_protection(info: OptimizerInfo, storage_dtype: torch.dtype | None) -> str:
    """What protects the parameter update from rounding away, in words."""
    if storage_dtype is not None and not (storage_dtype.is_floating_point and storage_dtype.itemsize < 4):
        return f"not needed ({dtype_name(storage_dtype)} storage is the master copy)"
    if info.kind is OptimizerKind.KEEPS_MASTER:
        if info.master_label:
            return f"yes ({info.master_label})"
        return f"yes ({16 + 8 * info.master_bytes}-bit master)" if info.master_bytes else "yes"
    if info.kind is OptimizerKind.COMPENSATED:
        return "compensated (Kahan)" if info.compensation_buffer else "compensated (stochastic rounding)"
    return "no" if info.kind is OptimizerKind.STATE_FOLLOWS_PARAM else "unknown"


def observed_state_dtypes(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], info: OptimizerInfo | None = None
) -> str | None:
    """The moment dtypes the optimizer really keeps for ``params`` (``exp_avg / exp_avg_sq`` when they differ), in
    the same words as :meth:`~lightning_precision.catalogue.OptimizerInfo.state_text` predicts them; ``info`` is its
    classification, when the caller has it."""
    info = info or classify_optimizer(optimizer)
    found = observed_moment_dtypes(optimizer, params, info)
    return " / ".join(dict.fromkeys(info.moment_words(k, d) for k, d in found.items())) if found else None


def optimizer_contract(
    verdict: Verdict, observed_state: str | None = None, also_updates: str = ""
) -> OptimizerContract:
    """One contract line from a verdict, with the state dtype read from the optimizer when it has stepped, and what
    it updates beside the judged parameters (see :func:`also_updated`)."""
    info = verdict.optimizer
    storage = verdict.storage_dtype
    if info is None:
        return OptimizerContract("-", dtype_name(storage), "-", "-", verdict.status.value, verdict.message)
    state = observed_state if observed_state is not None else info.state_text(storage)
    return OptimizerContract(
        optimizer=info.name,
        storage_dtype=dtype_name(storage),
        state_dtype=state,
        master_weights=describe_protection(info, storage),
        verdict=verdict.status.value,
        message=verdict.message,
        observed=observed_state is not None,
        also_updates=also_updates,
    )


def also_updated(optimizer: torch.optim.Optimizer, verdict: Verdict, *, observe_state: bool = False) -> str:
    """The trainable parameters of ``optimizer`` stored in another dtype than the judged ones, per dtype, with their
    state dtype (read from the state after a step with ``observe_state``, else predicted): ``"4 float32 tensors (40
    elements), state float32"``; empty when there are none."""
    info = verdict.optimizer
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in trainable_params(optimizer):
        if param.dtype != verdict.storage_dtype:
            by_dtype.setdefault(param.dtype, []).append(param)
    parts = []
    for dtype, params in by_dtype.items():
        state = observed_state_dtypes(optimizer, params, info) if observe_state else None
        if state is None:
            state = info.state_text(dtype) + " (predicted)" if info is not None else "-"
        elements = sum(p.numel() for p in params)
        parts.append(f"{len(params)} {dtype_name(dtype)} tensors ({elements:,} elements), state {state}")
    return "; ".join(parts)


def build_contract(
    precision: str,
    optimizers: Sequence[torch.optim.Optimizer],
    verdicts: Sequence[Verdict],
    *,
    compute_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None = None,
    fp32_modules: Iterable[str] = (),
    observe_state: bool = False,
    accumulate_grad_batches: int | None = 1,
    accumulate_grad_dtype: torch.dtype | None = None,
    model_cast: str = "",
    parameters: tuple[str, str] = ("-", "-"),
) -> PrecisionContract:
    """The contract of a run from its live optimizers and their verdicts (the Trainer guard and Fabric's ``check``).

    Args:
        precision: The precision string in effect.
        optimizers: The optimizers, in the order of ``verdicts``.
        verdicts: What the pairing rule said about each.
        compute_dtype: Dtype of forward/backward math.
        reduce_dtype: Dtype of gradient reduction, if set.
        fp32_modules: Submodules kept in fp32 (duplicates are dropped).
        observe_state: Read the optimizer-state dtypes from the state tensors (after a step) instead of predicting
            them.
        accumulate_grad_batches: Micro-batches summed into each step (``None``: decided by a Fabric loop).
        accumulate_grad_dtype: The plugin's or strategy's ``accumulate_grad_dtype`` (``None``: the storage dtype).
        model_cast: What the precision plugin did to the model's dtypes (its ``model_cast``), if it says.
        parameters: The trainable and frozen parameter dtypes (:func:`parameter_dtypes`), if known.
    """
    rows = []
    for optimizer, verdict in zip(optimizers, verdicts):
        params = judged_params(optimizer)
        observed = observed_state_dtypes(optimizer, params, verdict.optimizer) if observe_state else None
        rows.append(
            optimizer_contract(verdict, observed, also_updated(optimizer, verdict, observe_state=observe_state))
        )
    storage = verdicts[0].storage_dtype if verdicts else None
    return PrecisionContract(
        precision=precision,
        compute_dtype=dtype_name(compute_dtype),
        reduce_dtype=dtype_name(reduce_dtype),
        optimizers=rows,
        fp32_modules=list(dict.fromkeys(fp32_modules)),
        accumulate_grad_batches=None if accumulate_grad_batches is None else int(accumulate_grad_batches),
        grad_accumulation_dtype=dtype_name(accumulation_dtype(storage, accumulate_grad_dtype)),
        model_cast=model_cast,
        trainable_dtypes=parameters[0],
        frozen_dtypes=parameters[1],
    )


def trainer_contract(
    trainer: Any,
    optimizers: Sequence[torch.optim.Optimizer],
    verdicts: Sequence[Verdict],
    *,
    observe_state: bool,
) -> PrecisionContract:
    """The contract of a Trainer run: what its strategy and precision plugin report (compute and reduce dtypes, the
    modules kept in fp32, gradient accumulation), with these optimizers and verdicts (see :func:`build_contract`)."""
    mode = known_mode(trainer.precision)
    strategy, plugin = trainer.strategy, trainer.precision_plugin
    return build_contract(
        str(trainer.precision),
        optimizers,
        verdicts,
        compute_dtype=getattr(strategy, "compute_dtype", None) or (mode.compute_dtype if mode else None),
        reduce_dtype=getattr(strategy, "reduce_dtype", None),
        fp32_modules=[*getattr(plugin, "fp32_module_names", ()), *getattr(strategy, "fp32_module_names", ())],
        observe_state=observe_state,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        accumulate_grad_dtype=accumulate_grad_dtype_of(plugin, strategy),
        model_cast=getattr(plugin, "model_cast", ""),
        parameters=parameter_dtypes(trainer.lightning_module) if trainer.lightning_module is not None else ("-", "-"),
    )


def log_contract(contract: PrecisionContract, verdicts: Sequence[Verdict], *, on_unsafe: str, where: str) -> None:
    """Log the contract table on rank zero, saying where it was built and pointing at the warning of an unsafe
    pairing (unless the policy ignores it)."""
    unsafe = on_unsafe != "ignore" and any(v.status is Status.UNSAFE for v in verdicts)
    info_rank_zero(f"{contract.format_table()}\n({where}{'; UNSAFE pairing, see warning' if unsafe else ''})")


def storage_changes(stored: PrecisionContract, current: PrecisionContract) -> list[tuple[str, str, str]]:
    """Storage-dtype changes between a checkpoint's contract and the run resuming from it.

    Returns:
        ``(optimizer, stored dtype, current dtype)`` for each optimizer whose parameters are now stored in another
        dtype, in optimizer order.
    """
    return [
        (now.optimizer, then.storage_dtype, now.storage_dtype)
        for then, now in zip(stored.optimizers, current.optimizers)
        if then.storage_dtype != now.storage_dtype
    ]


def is_narrowing(before: torch.dtype, after: torch.dtype) -> bool:
    """Whether moving values from ``before`` to ``after`` can lose bits (fp32 -> bf16, bf16 <-> fp16)."""
    return after.itemsize < before.itemsize or (after != before and after.itemsize == before.itemsize)


def report_storage_change(before: torch.dtype, after: torch.dtype, *, what: str, kept: str | None = None) -> None:
    """Say what a resume did to stored parameters: a widening is logged, a narrowing warned. Never silent.

    Args:
        before: Storage dtype recorded in the checkpoint.
        after: Storage dtype of the run that resumes.
        what: Which parameters and checkpoint, for the message (e.g. ``"torch.optim.AdamW parameters"``).
        kept: For a narrowing, what the loading kept of the lost bits (e.g. a compensation seeded from them), said
            instead of "rounded, losing the low bits".
    """
    if before == after:
        return
    head = f"Resumed {what} stored in {dtype_name(before)} into {dtype_name(after)} storage"
    cause = f"resume:{before}->{after}"
    if is_narrowing(before, after):
        lost = kept or (
            f"parameters and optimizer state were rounded to {dtype_name(after)} on load, losing the low bits of the "
            "trained values"
        )
        warn_once(cause, f"{head}: {lost}. Resume with {dtype_name(before)} storage to keep them exact.")
    else:
        # Only what this line knows: the stored values. Bits an optimizer keeps beside them (CompensatedAdamW's
        # compensation) are folded, or reported lost, by that optimizer's own state loading.
        info_once(cause, f"{head}: the stored parameter values were upcast exactly.")


def read_precision_contract(
    checkpoint: str | os.PathLike | dict[str, Any], *, weights_only: bool = True
) -> PrecisionContract | None:
    """Read back the precision contract a :class:`~lightning_precision.PrecisionGuard` wrote into a checkpoint.

    Args:
        checkpoint: A checkpoint file or a sharded checkpoint directory (``FSDP2Strategy``, ``ModelParallelStrategy``),
            local or an fsspec URL, or an already loaded checkpoint dict.
        weights_only: Passed to ``torch.load``; set ``False`` only for trusted checkpoints that pickle objects
            (e.g. hyperparameters) which ``weights_only`` loading refuses.

    Returns:
        The contract, or ``None`` if the checkpoint has none (saved without the guard).

    Raises:
        TypeError: If ``checkpoint`` is neither a path nor a dict.
    """
    expect_type(
        checkpoint, (*PATH_TYPES, dict), what="read_precision_contract(checkpoint=...)",
        expected="a checkpoint path (str or os.PathLike) or a loaded checkpoint dict",
    )  # fmt: skip
    if not isinstance(checkpoint, dict):
        from lightning.fabric.utilities.cloud_io import _load, get_filesystem
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        if get_filesystem(checkpoint).isdir(str(checkpoint)):
            # A sharded (distributed checkpoint) directory: Lightning keeps everything but the tensors, the contract
            # included, in its metadata file, so the shards need not be read.
            checkpoint = f"{str(checkpoint).rstrip('/')}/{_METADATA_FILENAME}"
        checkpoint = _load(checkpoint, map_location="cpu", weights_only=weights_only)
    data = checkpoint.get(CHECKPOINT_KEY)
    return PrecisionContract.from_dict(data) if data is not None else None
