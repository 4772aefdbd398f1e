"""``explain``'s memory table: will it fit? GiB per device for the config's recipe and the safe alternatives.

The alternatives are ``compare``'s recipes (:data:`~lightning_precision.cli.compare.RECIPES`), not a second list:
those the pairing rule judges unsafe are left out, and the full-precision-storage ones take the config's own
optimizer (fp32 storage makes any optimizer safe, so the question there is only what it costs). Every figure is
:func:`~lightning_precision.memory.estimate_bytes_per_param` times the parameter count, with one definition of peak
(:data:`~lightning_precision.memory.PEAK_DEFINITION`). Nothing the config names is built: the parameter count comes
from ``--params``, never from building the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision.catalogue import OptimizerInfo, classify_optimizer
from lightning_precision.cli.yaml_loading import ConfigInputError
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.memory import (
    PEAK_DEFINITION,
    DeviceMemory,
    MemoryEstimate,
    estimate_bytes_per_param,
    gib_per_device,
)
from lightning_precision.modes import get_mode
from lightning_precision.pairing import judge

PARAMS_FORMS = "an integer (125000000) or a number with K, M, B or T (125M, 1.5B, 7B)"
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_PARAMS = re.compile(r"(\d+(?:\.\d+)?)([KMBT]?)", re.IGNORECASE)


def parse_params(text: str) -> int:
    """``"7B"`` -> 7_000_000_000, ``"1.5B"``, ``"125M"``, ``"125000000"``.

    Raises:
        ConfigInputError: If the text is none of those forms, or is not a whole number of parameters above 0.
    """
    match = _PARAMS.fullmatch(text.strip().replace("_", ""))
    count = float(match[1]) * _SUFFIXES[match[2].upper()] if match else 0.0
    if count < 1 or count != int(count):
        raise ConfigInputError(f"--params {text!r} is not a parameter count. Use {PARAMS_FORMS}.")
    return int(count)


def check_devices(devices: int) -> int:
    """``--devices`` as given, once checked to be at least 1."""
    if devices < 1:
        raise ConfigInputError(f"--devices {devices} is not a device count. Use an integer >= 1 (default 1).")
    return devices


@dataclass(frozen=True)
class MemoryRow:
    """One recipe of the table.

    Attributes:
        recipe: ``precision + optimizer`` in words.
        precision: The trainer's precision string.
        optimizer: The optimizer's class name.
        storage_dtype: Parameter storage.
        status: The pairing rule's verdict.
        own: Whether this is the config's own recipe.
        needs_cuda: Whether the recipe only runs on CUDA.
        estimate: Bytes per parameter.
        per_device: GiB per device, when the parameter count is known.
    """

    recipe: str
    precision: str
    optimizer: str
    storage_dtype: str
    status: str
    own: bool
    needs_cuda: bool
    estimate: MemoryEstimate
    per_device: DeviceMemory | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "storage_dtype": self.storage_dtype,
            "status": self.status,
            "own": self.own,
            "needs_cuda": self.needs_cuda,
            "bytes_per_param": self.estimate.to_dict(),
            "gib_per_device": self.per_device.to_dict() if self.per_device else None,
        }


@dataclass(frozen=True)
class MemoryTable:
    """The config's recipe and the alternatives, per device.

    Attributes:
        rows: The config's own recipe first (if its storage dtype is known), then the alternatives.
        params: Trainable parameters (``None``: not given, bytes per parameter only).
        devices: Devices the run uses.
        sharded: Whether the strategy shards parameters, gradients and state (FSDP2).
        on_cpu: Whether the parameters live on the CPU (the step's temporaries differ there).
    """

    rows: tuple[MemoryRow, ...]
    params: int | None
    devices: int
    sharded: bool
    on_cpu: bool

    @property
    def device_text(self) -> str:
        return "CPU (trainer.accelerator: cpu)" if self.on_cpu else "accelerator (CUDA assumed)"

    def format_lines(self) -> list[str]:
        """The table, indented like the contract."""
        if self.params is None:
            head = ["recipe", "B/param steady", "B/param peak", "verdict"]
            cells = [[_label(r), _num(r.estimate.total), _num(r.estimate.peak), r.status] for r in self.rows]
            title = "Memory, bytes per parameter (pass --params N, e.g. --params 7B, for GiB per device):"
        else:
            head = ["recipe", "weights", "grads", "optimizer state", "steady", "peak", "verdict"]
            cells = [[_label(r), *_gib_cells(r.per_device), r.status] for r in self.rows]
            layout = f"FSDP2, sharded over {self.devices}" if self.sharded else f"replicated on each of {self.devices}"
            title = f"Memory per device, GiB ({self.params:,} parameters, {layout} device(s)):"
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        line = lambda row: "    " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [f"  {title}", line(head), *(line(c) for c in cells)]
        lines.append(f"    {PEAK_DEFINITION}; device: {self.device_text}.")
        if self.params is None:
            lines.append(
                "    explain never builds the model a config names, so it does not count its parameters: pass "
                "--params (the count from your model card or a trusted build) and --devices."
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": PEAK_DEFINITION,
            "unit": "GiB per device" if self.params is not None else "bytes per parameter",
            "params": self.params,
            "devices": self.devices,
            "sharded": self.sharded,
            "device": "cpu" if self.on_cpu else "accelerator",
            "rows": [r.to_dict() for r in self.rows],
        }


def memory_table(
    *,
    precision: str,
    storage_dtype: torch.dtype | None,
    own_estimate: MemoryEstimate | None,
    own_info: OptimizerInfo | None,
    own_status: str,
    params: int | None,
    devices: int,
    sharded: bool,
    on_cpu: bool,
) -> MemoryTable:
    """The config's recipe (as ``explain`` resolved it) and compare's safe recipes, per device.

    Args:
        precision: The config's precision string.
        storage_dtype: The config's parameter storage (``None``: left to the model; its row is left out).
        own_estimate: The config's bytes per parameter, as ``explain`` estimated it.
        own_info: The config's classified optimizer (``None``: no optimizer section).
        own_status: The config's verdict.
        params: Trainable parameters, if given.
        devices: Devices the run uses.
        sharded: Whether the strategy shards over the devices (FSDP2).
        on_cpu: Whether the config's parameters live on the CPU.
    """
    from lightning_precision.cli.compare import RECIPES  # the one list of recipes

    def row(recipe: str, precision: str, info: OptimizerInfo | None, storage: torch.dtype, status: str, *,
            own: bool, needs_cuda: bool, estimate: MemoryEstimate) -> MemoryRow:  # fmt: skip
        per_device = gib_per_device(estimate, params, devices=devices, sharded=sharded) if params else None
        name = info.short_name if info is not None else "-"
        return MemoryRow(recipe, precision, name, dtype_name(storage), status, own, needs_cuda, estimate, per_device)

    rows = []
    if storage_dtype is not None and own_estimate is not None:
        name = f"{precision} + {own_info.short_name if own_info else 'no optimizer'}"
        rows.append(row(name, precision, own_info, storage_dtype, own_status, own=True, needs_cuda=False,
                        estimate=own_estimate))  # fmt: skip
    for recipe in RECIPES.values():
        mode = get_mode(recipe.precision)
        # A mixed precision leaves storage to the model: the recipe is the pairing rule's fix (1), fp32 storage.
        storage = mode.storage_dtype or torch.float32
        # fp32 storage is safe with any optimizer: show what the config's own optimizer costs there.
        keep_own = own_info is not None and storage not in HALF_DTYPES
        info = own_info if keep_own else classify_optimizer(recipe.optimizer)
        verdict = judge(storage, info, precision=mode)
        own = own_info is not None and (recipe.precision, info.name, storage) == (precision, own_info.name,
                                                                                   storage_dtype)  # fmt: skip
        if verdict.is_unsafe or own:
            continue
        on_cuda = recipe.needs_cuda or not on_cpu
        estimate = estimate_bytes_per_param(storage, info, on_cpu=not on_cuda)
        if estimate is not None:
            name = f"{recipe.precision} + {info.short_name}"
            rows.append(row(name, recipe.precision, info, storage, verdict.status.value, own=False,
                            needs_cuda=recipe.needs_cuda, estimate=estimate))  # fmt: skip
    return MemoryTable(tuple(rows), params, devices, sharded, on_cpu)


def _label(row: MemoryRow) -> str:
    return row.recipe + (" (this config)" if row.own else "") + (" (CUDA)" if row.needs_cuda else "")


def _num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def _gib_cells(memory: DeviceMemory | None) -> list[str]:
    if memory is None:
        return ["-"] * 5
    values = (memory.weights, memory.grads, memory.optimizer_state, memory.steady, memory.peak)
    return ["unknown" if v is None else f"{v:.2f}" for v in values]
