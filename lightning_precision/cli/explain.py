"""``lightning-precision explain``: what a config will do to parameters and optimizer state, without training.

Everything here asks :func:`~lightning_precision.config.plan_trainer_cfg` and the pairing rule; nothing decides
a dtype on its own. The config may come from anyone, so nothing it names is built or called (``build=False``): each
plugin, callback and strategy is imported, checked to be a class, and read from its arguments and signature
defaults. An FSDP2 strategy's decision on storage, compute and reduce dtypes is planned from its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_precision.config import TrainerKwargs, plan_trainer_cfg
from lightning_precision.config_classes import ClassSpec, class_of
from lightning_precision.config_frameworks import stand_in_note
from lightning_precision.dtypes import dtype_name
from lightning_precision.grad_accumulation import (
    accumulate_grad_dtype_of,
    accumulation_dtype,
    parse_accumulate_grad_dtype,
)
from lightning_precision.memory import PEAK_DEFINITION, MemoryEstimate, estimate_bytes_per_param
from lightning_precision.modes import LIGHTNING_PLUGINS, MODES
from lightning_precision.pairing import Status, Verdict
from lightning_precision.policy import pairing_error
from lightning_precision.report import PrecisionContract, optimizer_contract

if TYPE_CHECKING:
    from lightning_precision.cli.explain_memory import MemoryTable

LIGHTNING_DEFAULT_PRECISION = "32-true"


@dataclass
class Explanation:
    """The answer to "what will this config do?".

    Attributes:
        source: Where the config came from (file name).
        contract: The precision contract (shared with the runtime guard).
        plugin: The precision plugin that will be used.
        strategy: The strategy named by the config (``"auto"`` if none).
        storage_dtype: Storage dtype of the trainable parameters (``"-"``: left to the model).
        optimizer_state: The optimizer's state, moment by moment.
        memory: Estimated bytes per parameter, if the storage dtype is known.
        verdict: The pairing rule's verdict (``None`` without an optimizer section).
        on_unsafe: The policy in effect.
        error: The :class:`PrecisionPairingError` message when the config is unsafe under ``on_unsafe="error"``.
        memory_table: GiB per device (bytes per parameter without a parameter count) for this recipe and the safe
            alternatives.
    """

    source: str
    contract: PrecisionContract
    plugin: str
    strategy: str
    storage_dtype: str
    optimizer_state: str
    memory: MemoryEstimate | None
    verdict: Verdict | None
    on_unsafe: str
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    memory_table: MemoryTable | None = None

    @property
    def fails(self) -> bool:
        """Whether a linter would fail it: an unsafe verdict, unless ``on_unsafe="ignore"`` accepts the risk."""
        return bool(self.verdict and self.verdict.is_unsafe) and self.on_unsafe != "ignore"

    @property
    def status(self) -> str:
        """The verdict's status, or ``"not judged"`` without an optimizer."""
        return self.verdict.status.value if self.verdict is not None else Status.NOT_JUDGED.value

    def rows(self) -> list[tuple[str, str]]:
        """The table as ``(label, value)`` rows."""
        row = self.contract.optimizers[0] if self.contract.optimizers else None
        return [
            ("precision", self.contract.precision),
            ("plugin / strategy", f"{self.plugin} / {self.strategy}"),
            ("parameter storage", self.storage_dtype),
            ("compute", self.contract.compute_dtype),
            ("gradient reduce (FSDP2)", self.contract.reduce_dtype),
            ("gradient accumulation", self.contract.accumulation_text),
            ("optimizer", row.optimizer if row else "- (no optimizer section)"),
            ("optimizer state", self.optimizer_state),
            ("master weights / error correction", row.master_weights if row else "-"),
            ("bytes per parameter", self._memory_text(row is not None)),
            ("verdict", self._verdict_text()),
        ]

    def _memory_text(self, has_optimizer: bool) -> str:
        if self.memory is None:
            return "- (storage dtype not known)"
        if not has_optimizer:
            return f"~{self.memory.params + self.memory.grads:g} B/param: params + grads only (no optimizer section)"
        return self.memory.describe()

    def _verdict_text(self) -> str:
        text = self.status.upper() if self.verdict and self.verdict.is_unsafe else self.status
        if self.verdict and self.verdict.is_unsafe:
            text += f" (on_unsafe={self.on_unsafe})"
        return text

    def format_text(self) -> str:
        """The human-readable table, followed by the verdict's message and fixes."""
        rows = self.rows()
        width = max(len(label) for label, _ in rows)
        lines = [f"Precision contract for {self.source}" if self.source else "Precision contract"]
        lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
        if self.verdict is not None and self.verdict.fixes:
            lines.append("  Two ways to fix it:")
            lines += [f"    ({i}) {fix}" for i, fix in enumerate(self.verdict.fixes, 1)]
        elif self.verdict is not None and self.verdict.message:
            lines.append(f"  Note: {self.verdict.message}")
        lines += [f"  Note: {note}" for note in self.notes]
        if self.memory_table is not None:
            lines += self.memory_table.format_lines()
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The same as plain data, for ``--json``."""
        return {
            "source": self.source,
            "precision": self.contract.precision,
            "plugin": self.plugin,
            "strategy": self.strategy,
            "storage_dtype": self.storage_dtype,
            "compute_dtype": self.contract.compute_dtype,
            "reduce_dtype": self.contract.reduce_dtype,
            "accumulate_grad_batches": self.contract.accumulate_grad_batches,
            "grad_accumulation_dtype": self.contract.grad_accumulation_dtype,
            "optimizer_state": self.optimizer_state,
            "bytes_per_param": self.memory.to_dict() if self.memory else None,
            "peak_definition": PEAK_DEFINITION,
            "memory": self.memory_table.to_dict() if self.memory_table else None,
            "verdict": {
                "status": self.status,
                "unsafe": bool(self.verdict and self.verdict.is_unsafe),
                "message": self.verdict.message if self.verdict else "",
                "fixes": list(self.verdict.fixes) if self.verdict else [],
                "on_unsafe": self.on_unsafe,
            },
            "contract": self.contract.to_dict(),
            "error": self.error,
            "notes": list(self.notes),
        }


def explain(
    trainer_cfg: Mapping[str, Any],
    model_cfg: Mapping[str, Any] | None = None,
    optimizer_cfg: Any = None,
    *,
    source: str = "",
    notes: Sequence[str] = (),
    params: int | None = None,
    devices: int = 1,
) -> Explanation:
    """Resolve a config through :func:`plan_trainer_cfg` and the pairing rule, without building a model, and without
    building or calling anything the config names.

    An unsafe pairing under ``on_unsafe="error"`` does not raise here: the explanation is built anyway and carries
    the error message in :attr:`Explanation.error`, so the caller can show the table and then fail.

    Args:
        trainer_cfg: The trainer section (plain mapping).
        model_cfg: The model section, if any; it may hold the optimizer (NeMo's ``optim``, LightningCLI's
            ``init_args.optimizer``, ...).
        optimizer_cfg: The top-level optimizer section (``_target_`` or ``class_path``), if any.
        source: Where the config came from, for the title.
        notes: Notes on reading the config (sections ignored), shown after the table.
        params: Trainable parameters of the model (``None``: bytes per parameter only; the model is never built to
            count them).
        devices: Devices the run uses; with an FSDP2 strategy everything is sharded over them.

    Returns:
        The explanation.

    Raises:
        PrecisionConfigError: If the config is not valid (unknown precision, bad dtype, import failure, a
            ``class_path``/``_target_`` that names a function or module rather than a class, ...).
    """
    # Judged once, not acted on; build=False: read the classes the file names, never run them.
    kwargs = plan_trainer_cfg(trainer_cfg, model=model_cfg, optimizer=optimizer_cfg, build=False)
    failure = pairing_error(kwargs.verdict, kwargs.on_unsafe, where="config") if kwargs.verdict is not None else None
    error = str(failure) if failure is not None else None
    read_notes = [n for n in map(stand_in_note, kwargs.get("plugins", [])) if n]  # NeMo 2's plugin, not imported
    result = _build(kwargs, source, error, [*notes, *read_notes, *_optimizer_notes(kwargs), *kwargs.upstream_faults])
    result.memory_table = _memory_table(kwargs, result, params, devices)
    return result


def _memory_table(kwargs: TrainerKwargs, result: Explanation, params: int | None, devices: int) -> MemoryTable:
    from lightning_precision.cli.explain_memory import memory_table

    mode = kwargs.precision_mode or MODES[LIGHTNING_DEFAULT_PRECISION]
    return memory_table(
        precision=mode.name,
        storage_dtype=kwargs.storage_dtype if kwargs.storage_dtype is not None else mode.storage_dtype,
        own_estimate=result.memory,
        own_info=kwargs.verdict.optimizer if kwargs.verdict is not None else None,
        own_status=result.status,
        params=params,
        devices=devices,
        sharded=kwargs.sharded is not None,
        on_cpu=_on_cpu(kwargs),
    )


def _on_cpu(kwargs: TrainerKwargs) -> bool:
    """Whether the parameters will live on the CPU: only ``accelerator: cpu`` says so; ``auto`` finds an accelerator
    where the run is meant to go."""
    return str(kwargs.get("accelerator", "auto")).lower() == "cpu"


def _optimizer_notes(kwargs: TrainerKwargs) -> list[str]:
    """Where the judged optimizer came from, when it was not the top-level ``optimizer`` section."""
    if kwargs.layout_notes:
        return list(kwargs.layout_notes)
    if kwargs.optimizer_path not in (None, "optimizer"):
        return [f"optimizer read from {kwargs.optimizer_path}"]
    return []


def _build(kwargs: TrainerKwargs, source: str, error: str | None, notes: list[str]) -> Explanation:
    mode = kwargs.precision_mode or MODES[LIGHTNING_DEFAULT_PRECISION]
    storage = kwargs.storage_dtype if kwargs.storage_dtype is not None else mode.storage_dtype
    verdict = kwargs.verdict
    micro_batches = int(kwargs.get("accumulate_grad_batches", 1))
    buffers = _accumulate_grad_dtype(*kwargs.get("plugins", []), kwargs.get("strategy"))
    summed_in = accumulation_dtype(storage, buffers)
    contract = PrecisionContract(
        precision=mode.name if kwargs.precision_mode else f"{mode.name} (Lightning's default)",
        compute_dtype=dtype_name(kwargs.sharded.compute_dtype if kwargs.sharded else mode.compute_dtype),
        reduce_dtype=dtype_name(kwargs.sharded.reduce_dtype if kwargs.sharded else None),
        optimizers=[optimizer_contract(verdict)] if verdict is not None else [],
        accumulate_grad_batches=micro_batches,
        grad_accumulation_dtype=dtype_name(summed_in),
    )
    info = verdict.optimizer if verdict is not None else None
    # While a step accumulates, the fp32 buffers replace the half gradient.
    memory = estimate_bytes_per_param(
        storage, info, grad_dtype=summed_in if micro_batches > 1 else None, on_cpu=_on_cpu(kwargs)
    )
    return Explanation(
        source=source,
        contract=contract,
        plugin=_plugin_name(kwargs, mode.name),
        strategy=_strategy_name(kwargs.get("strategy")),
        storage_dtype=dtype_name(storage) if storage is not None else "- (left to the model)",
        optimizer_state=_state_text(memory, contract),
        memory=memory,
        verdict=verdict,
        on_unsafe=kwargs.on_unsafe,
        error=error,
        notes=notes,
    )


def _state_text(memory: MemoryEstimate | None, contract: PrecisionContract) -> str:
    """The optimizer state moment by moment (``exp_avg bfloat16, exp_avg_sq float32``)."""
    if not contract.optimizers:
        return "-"
    if memory is not None:
        moments = [name for name, _ in memory.state_parts if name.startswith(("exp_avg", "momentum"))]
        if moments:
            return ", ".join(moments) + " (predicted)"
    return f"{contract.optimizers[0].state_dtype} (predicted)"


def _accumulate_grad_dtype(*components: Any) -> Any:
    """``accumulate_grad_dtype`` of a plugin or strategy: a spec's argument (or default), a built one's attribute."""
    for component in components:
        if isinstance(component, ClassSpec):
            what = f"{component.where}.accumulate_grad_dtype"
            dtype = parse_accumulate_grad_dtype(component.arg("accumulate_grad_dtype"), what=what)
            if dtype is not None:
                return dtype
    return accumulate_grad_dtype_of(*(c for c in components if not isinstance(c, ClassSpec)))


def _plugin_name(kwargs: TrainerKwargs, precision: str) -> str:
    for plugin in kwargs.get("plugins", []):
        if hasattr(class_of(plugin), "convert_module"):  # a precision plugin
            return class_of(plugin).__name__
    lightning = LIGHTNING_PLUGINS.get(precision) if MODES[precision].family == "lightning" else None
    return f"{lightning} (Lightning)" if lightning else "-"


def _strategy_name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    return strategy if isinstance(strategy, str) else class_of(strategy).__name__
