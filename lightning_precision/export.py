"""Export the trained weights of a checkpoint as ``safetensors``, in the most exact values the checkpoint holds.

A bf16 run with :class:`~lightning_precision.CompensatedAdamW` keeps each weight as ``p + c`` (the bf16 parameter
plus its Kahan compensation); exporting ``p`` alone would drop the bits the optimizer worked to keep. Here each
weight is computed exactly (``p + c`` summed in fp32, an fp32 master copy, or the stored fp32 value) and rounded to
nearest into the target dtype once. What the run kept in fp32 on purpose (norms, BatchNorm, front ends: stored fp32
in an otherwise half checkpoint, or named in the contract's ``fp32_modules``) stays fp32 unless
``keep_fp32="none"``; integer buffers are written as stored.

Tied weights (one storage under two names, e.g. ``lm_head.weight`` and ``embed_tokens.weight``) are written once,
under the first name in state-dict order, as ``save_pretrained`` does: safetensors refuses shared tensors and
``from_pretrained`` re-ties the other name. Reading and writing go tensor by tensor (see
:mod:`~lightning_precision.export_read` and :mod:`~lightning_precision.export_write`), so memory stays near one
tensor however large the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.export_read import WeightEntry, open_checkpoint
from lightning_precision.export_write import PlannedTensor, StagedOutput, parse_size, write_sharded
from lightning_precision.values import PATH_TYPES, expect_type

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KEEP_FP32_CHOICES = ("auto", "none")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's default

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "EXPORT_DTYPES",
    "KEEP_FP32_CHOICES",
    "ExportResult",
    "ExportedTensor",
    "export_weights",
]


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor written.

    Attributes:
        name: Its name in the output (after ``strip_prefix``).
        dtype: The dtype written.
        nbytes: Bytes of data written.
        max_abs_diff: Largest ``|exported - exact|``, where exact is the checkpoint's most exact value (``p + c`` in
            fp32 for a compensated weight); 0 for integer tensors.
        exact_from: ``"compensated"``, ``"master"`` or ``"stored"`` (see
            :class:`~lightning_precision.export_read.WeightEntry`).
        kept_fp32: Whether it stayed fp32 because the run kept it fp32.
    """

    name: str
    dtype: torch.dtype
    nbytes: int
    max_abs_diff: float
    exact_from: str
    kept_fp32: bool = False


@dataclass
class ExportResult:
    """What :func:`export_weights` wrote.

    Attributes:
        files: The files written (``model.safetensors``, or shards and the index).
        tensors: One row per tensor written, in output order.
        tied: Names left out because they share storage with a written tensor: ``{left out: written}``.
    """

    files: list[Path]
    tensors: list[ExportedTensor]
    tied: dict[str, str] = field(default_factory=dict)

    def format_table(self) -> str:
        """Tensors, dtype, bytes written and the largest change against the exact value, by output dtype."""
        groups: dict[tuple[str, str], list[ExportedTensor]] = {}
        for t in self.tensors:
            why = "kept fp32" if t.kept_fp32 else ("as stored" if not t.dtype.is_floating_point else "")
            groups.setdefault((dtype_name(t.dtype), why), []).append(t)
        head = ("dtype", "tensors", "bytes written", "max |exported - exact|", "note")
        rows = [
            (dt, str(len(ts)), f"{sum(t.nbytes for t in ts):,}", f"{max(t.max_abs_diff for t in ts):.3g}", why)
            for (dt, why), ts in groups.items()
        ]
        total = ("total", str(len(self.tensors)), f"{sum(t.nbytes for t in self.tensors):,}", "", "")
        widths = [max(len(r[i]) for r in [head, *rows, total]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows), line(total)]
        compensated = sum(1 for t in self.tensors if t.exact_from == "compensated")
        if compensated:
            out.append(f"{compensated} weights exported from p + compensation (CompensatedAdamW), summed in fp32.")
        worst = max(self.tensors, key=lambda t: t.max_abs_diff, default=None)
        if worst is not None:
            out.append(
                f"largest change: {worst.name} ({worst.max_abs_diff:.3g})"
                if worst.max_abs_diff > 0
                else "largest change: none (every tensor written exactly)"
            )
        if self.tied:
            out.append(f"tied, written once: {', '.join(f'{k} -> {v}' for k, v in self.tied.items())}")
        out.append(f"wrote: {', '.join(str(p) for p in self.files)}")
        return "\n".join(out)


def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise PrecisionConfigError(f"{what}={value!r} is not supported. Valid choices: {', '.join(choices)}.")


def _fp32_modules(contract: dict[str, Any] | None) -> list[str]:
    modules = (contract or {}).get("fp32_modules") or []
    return [m for m in modules if isinstance(m, str) and m]


def _output_dtype(
    entry: WeightEntry, target: torch.dtype, keep: bool, half_run: bool, fp32_modules: list[str]
) -> tuple[torch.dtype, bool]:
    """The dtype a tensor is written in, and whether it stays fp32 because the run kept it fp32."""
    if not entry.dtype.is_floating_point:
        return entry.dtype, False
    if keep and target != torch.float32:
        stored_fp32 = half_run and entry.dtype == torch.float32  # fp32 in a half checkpoint: kept on purpose
        named = any(entry.name == m or entry.name.startswith(m + ".") for m in fp32_modules)
        if stored_fp32 or named:
            return torch.float32, True
    return target, False


def _max_abs_diff(exported: torch.Tensor, exact: torch.Tensor, chunk: int = 2**22) -> float:
    """``max |exported - exact|`` in a dtype wide enough for both, a chunk at a time (the temporaries of a whole
    embedding matrix would be several times the tensor)."""
    wide = torch.promote_types(torch.promote_types(exact.dtype, exported.dtype), torch.float32)
    a, b = exported.reshape(-1), exact.reshape(-1)
    worst = 0.0
    for i in range(0, a.numel(), chunk):
        d = torch.sub(a[i : i + chunk].to(wide), b[i : i + chunk].to(wide)).abs_()  # out of place: .to may alias
        worst = max(worst, float(d.max()))
    return worst


def export_weights(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    strip_prefix: str | None = None,
    keep_fp32: Literal["auto", "none"] = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportResult:
    """Write a checkpoint's weights as ``model.safetensors`` (sharded with an index above ``max_shard_size``).

    Each weight is written as its most exact value in the checkpoint (``p + c`` of CompensatedAdamW in fp32, an fp32
    master copy, or the stored value), rounded to nearest into ``dtype``. Names are those of the model's
    ``state_dict``; tied weights are written once (``from_pretrained`` re-ties them). Only weights are written: put
    the model's ``config.json`` beside them (``config.save_pretrained(output_dir)``) for Hugging Face loading.

    Args:
        checkpoint: A single-file Lightning checkpoint, or a distributed checkpoint directory (``FSDP2Strategy``).
            Read on one process, without a process group.
        output_dir: Directory for the files (created if missing). Files of an earlier export there are replaced.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        strip_prefix: Removed from the start of each name that has it (``"model."`` for a Hugging Face model held
            as ``self.model`` in a LightningModule).
        keep_fp32: ``"auto"``: tensors the run kept in fp32 (stored fp32 in a half-precision checkpoint, or under the
            contract's ``fp32_modules``) stay fp32; ``"none"``: every floating tensor is written in ``dtype``.
        max_shard_size: Largest data size of one file, as bytes or a string such as ``"5GB"``.

    Returns:
        What was written, with the largest change of each tensor against its exact value.

    Raises:
        TypeError: If ``checkpoint`` or ``output_dir`` is not a path, or ``strip_prefix`` not a string.
        PrecisionConfigError: If ``dtype``, ``keep_fp32`` or ``max_shard_size`` is not a valid choice.
        CheckpointExportError: If the checkpoint is missing, not a checkpoint, a distributed checkpoint with missing
            shards, or its optimizer state cannot be matched to weights; or ``output_dir`` is not writable. Nothing is
            left under the output names then.
    """
    for name, path in (("checkpoint", checkpoint), ("output_dir", output_dir)):
        expect_type(path, PATH_TYPES, what=f"export_weights({name}=...)", expected="a path (str or os.PathLike)")
    expect_type(strip_prefix, (str, type(None)), what="export_weights(strip_prefix=...)", expected="a string")
    target = EXPORT_DTYPES[_choice(dtype, tuple(EXPORT_DTYPES), "dtype")]
    keep = _choice(keep_fp32, KEEP_FP32_CHOICES, "keep_fp32") == "auto"
    max_bytes = parse_size(max_shard_size)
    reader = open_checkpoint(checkpoint)
    half_run = any(e.dtype in HALF_DTYPES for e in reader.entries)
    fp32_modules = _fp32_modules(reader.contract)

    def out_name(name: str) -> str:
        return name[len(strip_prefix) :] if strip_prefix and name.startswith(strip_prefix) else name

    planned: list[PlannedTensor] = []
    sources: dict[str, tuple[WeightEntry, bool]] = {}
    tied: dict[str, str] = {}
    for entry in reader.entries:
        if entry.tied_to is not None:
            tied[out_name(entry.name)] = out_name(entry.tied_to)
            continue
        name = out_name(entry.name)
        if name in sources:
            raise PrecisionConfigError(
                f"strip_prefix={strip_prefix!r} maps two tensors to {name!r} ({sources[name][0].name!r} and "
                f"{entry.name!r}). Use a longer prefix, or none."
            )
        out_dtype, kept = _output_dtype(entry, target, keep, half_run, fp32_modules)
        planned.append(PlannedTensor(name, entry.shape, out_dtype))
        sources[name] = (entry, kept)

    rows: list[ExportedTensor] = []

    def value(t: PlannedTensor) -> torch.Tensor:
        entry, kept = sources[t.name]
        _, exact = reader.exact(entry)
        exported = exact.to(t.dtype)  # round to nearest even: torch's float conversion
        diff = _max_abs_diff(exported, exact) if exact.is_floating_point() else 0.0
        rows.append(ExportedTensor(t.name, t.dtype, t.nbytes, diff, entry.exact_from, kept))
        reader.release()
        return exported

    staged = StagedOutput(output_dir)
    try:
        names = write_sharded(staged, planned, value, max_bytes)
        files = staged.publish(names)
    except BaseException:  # DCP's CheckpointException is a BaseException too: never leave the staging directory
        staged.discard()
        raise
    return ExportResult(files=files, tensors=rows, tied=tied)
