"""Reading the weights of a checkpoint for ``export``, one tensor at a time, without the model or a process group.

Two layouts are read: a single-file Lightning checkpoint (``torch.load(..., mmap=True)``: a tensor's bytes are read
when it is used) and a distributed-checkpoint (DCP) directory as ``FSDP2Strategy`` saves it (each tensor is loaded
whole from its shards with ``no_dist=True``). For each weight the reader also finds what makes it exact: the
``compensation`` buffer of :class:`~lightning_precision.CompensatedAdamW` (``p + c`` summed in fp32) or an fp32
master copy in the optimizer state.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_precision.errors import CheckpointExportError
from lightning_precision.export_record import PARAM_NAMES_KEY
from lightning_precision.report import CHECKPOINT_KEY

COMPENSATION_KEY = "compensation"  # CompensatedAdamW's Kahan buffer: p + c is the weight
MASTER_KEYS = ("master_param", "master_weight", "master_weights", "master")  # fp32 master copies, by common names
_DCP_METADATA = ".metadata"
_LIGHTNING_METADATA = "meta.pt"  # what Lightning writes beside the shards: everything but the tensors
# A single-file reader reopens its memory map after this many bytes were read, so pages of tensors already exported
# leave the process (a file mapping's pages count in its RSS until unmapped).
_REMAP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the model's state dict in the checkpoint.

    Attributes:
        name: Its name in the model's ``state_dict``.
        shape: Its shape.
        dtype: The dtype it is stored in.
        exact_from: Where its most exact value comes from: ``"compensated"`` (``p + c``), ``"master"`` (an fp32
            master copy) or ``"stored"`` (the stored tensor itself).
        tied_to: The name of an earlier entry sharing its storage (a tied weight), else ``None``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    exact_from: str = "stored"
    tied_to: str | None = None


def open_checkpoint(path: str | Path) -> SingleFileReader | DistributedReader:
    """A reader for a single-file checkpoint or a distributed checkpoint directory.

    Raises:
        CheckpointExportError: If ``path`` does not exist or is neither layout.
    """
    path = Path(path)
    if path.is_dir():
        return DistributedReader(path)
    if path.is_file():
        return SingleFileReader(path)
    raise CheckpointExportError(f"checkpoint {str(path)!r} does not exist.")


def _slot_tensor(state: dict[str, Any], shape: tuple[int, ...]) -> tuple[str, torch.Tensor] | None:
    """The state entry that makes a parameter exact: its compensation, else an fp32 (or wider) master copy."""
    comp = state.get(COMPENSATION_KEY)
    if isinstance(comp, torch.Tensor) and tuple(comp.shape) == shape:
        return "compensated", comp
    for key in MASTER_KEYS:
        master = state.get(key)
        if isinstance(master, torch.Tensor) and master.is_floating_point() and master.dtype.itemsize >= 4:
            if master.numel() == _numel(shape):
                return "master", master
    return None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _exact(stored: torch.Tensor, kind: str, extra: torch.Tensor | None) -> torch.Tensor:
    if kind == "compensated" and extra is not None:
        # The fp32 sum p + c (both widen exactly), the weight CompensatedAdamW trains; a copy, as stored may be mmapped.
        return stored.to(torch.float32, copy=True).add_(extra)
    if kind == "master" and extra is not None:
        return extra.reshape(stored.shape)
    return stored


class SingleFileReader:
    """A single-file Lightning checkpoint (``torch.save`` zip), memory-mapped.

    Args:
        path: The ``.ckpt`` file.

    Raises:
        CheckpointExportError: If it is not a Lightning checkpoint, or its optimizer state cannot be matched to its
            parameters without guessing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ckpt: dict[str, Any] | None = None
        self._read_since_open = 0
        ckpt = self._open()
        state = ckpt.get("state_dict")
        if not state or not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointExportError(
                f"{str(path)!r} has no 'state_dict' of tensors; expected a Lightning checkpoint "
                "(Trainer.save_checkpoint)."
            )
        self.contract: dict[str, Any] | None = ckpt.get(CHECKPOINT_KEY)
        seen: dict[tuple, str] = {}
        self.entries: list[WeightEntry] = []
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            tied = seen.setdefault(key, name) if t.numel() else name
            self.entries.append(WeightEntry(name, tuple(t.shape), t.dtype, tied_to=None if tied == name else tied))
        # name -> (optimizer index, state index, kind)
        self._slots = _optimizer_slots(ckpt, [e for e in self.entries if e.tied_to is None], path)
        self.entries = [
            WeightEntry(e.name, e.shape, e.dtype, self._slots[e.name][2], e.tied_to) if e.name in self._slots else e
            for e in self.entries
        ]

    def _open(self) -> dict[str, Any]:
        if self._ckpt is None:
            try:
                ckpt = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
                raise CheckpointExportError(
                    f"{str(self.path)!r} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else 'no details'})."
                ) from None
            if not isinstance(ckpt, dict):
                raise CheckpointExportError(f"{str(self.path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict.")
            self._ckpt, self._read_since_open = ckpt, 0
        return self._ckpt

    def exact(self, entry: WeightEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored tensor and its most exact value (``p + c`` in fp32, the master copy, or the stored tensor)."""
        ckpt = self._open()
        stored = ckpt["state_dict"][entry.name]
        extra = None
        if entry.name in self._slots:
            opt, idx, kind = self._slots[entry.name]
            found = _slot_tensor(ckpt["optimizer_states"][opt]["state"][idx], entry.shape)
            extra = found[1] if found else None
        self._read_since_open += stored.nbytes + (extra.nbytes if extra is not None else 0)
        return stored, _exact(stored, entry.exact_from, extra)

    def release(self) -> None:
        """Unmap the file once enough was read, so the pages of exported tensors leave memory."""
        if self._read_since_open >= _REMAP_BYTES:
            self._ckpt = None


def _optimizer_slots(ckpt: dict[str, Any], entries: list[WeightEntry], path: Path) -> dict[str, tuple[int, Any, str]]:
    """Which optimizer state holds each weight's compensation or master copy: by the recorded names, or (for
    checkpoints saved before names were recorded) by order and shape."""
    slots: dict[str, tuple[int, Any, str]] = {}
    recorded = ckpt.get(PARAM_NAMES_KEY)
    by_name = {e.name: e for e in entries}
    for oi, osd in enumerate(ckpt.get("optimizer_states") or []):
        if not isinstance(osd, dict) or "state" not in osd:
            continue
        order = [idx for group in osd.get("param_groups", []) for idx in group.get("params", [])]
        state = osd["state"]
        if not any(isinstance(s, dict) and _slot_tensor(s, _first_shape(s)) for s in state.values()):
            continue  # nothing in this optimizer makes a weight more exact
        if recorded is not None and oi < len(recorded) and len(recorded[oi]) == len(order):
            names = recorded[oi]
        else:
            names = match_by_order_and_shape(order, state, entries, path)
        for idx, name in zip(order, names):
            if name is None or idx not in state or name not in by_name:
                continue
            entry = by_name[name]
            found = _slot_tensor(state[idx], entry.shape)
            if found is not None and (found[0] != "compensated" or found[1].dtype == entry.dtype):
                slots[name] = (oi, idx, found[0])
    return slots


def _first_shape(state: dict[str, Any]) -> tuple[int, ...]:
    """A parameter's shape as its optimizer state shows it (moments and compensation have it)."""
    for key in (COMPENSATION_KEY, "exp_avg", "exp_avg_sq", "momentum_buffer"):
        t = state.get(key)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return tuple(t.shape)
    return ()


def match_by_order_and_shape(
    order: list[Any], state: dict[Any, Any], entries: list[WeightEntry], path: Path
) -> list[str | None]:
    """Map optimizer parameters to state-dict names for a checkpoint without recorded names.

    Optimizer parameters follow ``module.parameters()`` order, which is the state dict's order with the buffers left
    out. A parameter is matched to the one entry where it can sit in every order-preserving assignment consistent with
    the shapes (and, for a compensated parameter, the dtype of its compensation).

    Raises:
        CheckpointExportError: If a parameter that has a compensation or master copy could sit at more than one entry,
            or at none.
    """

    def fits(i: int, j: int) -> bool:
        s = state.get(order[i])
        if not isinstance(s, dict):
            return True  # no state yet (never stepped): its shape is unknown, any entry fits
        shape, comp = _first_shape(s), s.get(COMPENSATION_KEY)
        e = entries[j]
        if not e.dtype.is_floating_point or (shape and shape != e.shape):
            return False
        return not isinstance(comp, torch.Tensor) or comp.dtype == e.dtype

    n, m = len(order), len(entries)
    earliest, j = [], 0  # earliest[i]: leftmost entry param i can take with params < i placed before it
    for i in range(n):
        while j < m and not fits(i, j):
            j += 1
        earliest.append(j)
        j += 1
    latest, j = [0] * n, m - 1  # latest[i]: rightmost entry param i can take with params > i placed after it
    for i in range(n - 1, -1, -1):
        while j >= 0 and not fits(i, j):
            j -= 1
        latest[i] = j
        j -= 1
    if n and (earliest[-1] >= m or latest[0] < 0):
        raise CheckpointExportError(
            f"{str(path)!r}: the optimizer state of its {n} parameters does not fit the shapes of its state_dict, so "
            "the compensation/master buffers cannot be matched to weights. Re-save it with this version of "
            "lightning_precision (it records the parameter names)."
        )
    names: list[str | None] = []
    for i in range(n):
        candidates = [j for j in range(earliest[i], latest[i] + 1) if fits(i, j)]
        needed = isinstance(state.get(order[i]), dict) and _slot_tensor(state[order[i]], _first_shape(state[order[i]]))
        if needed and len(candidates) != 1:
            shown = ", ".join(entries[j].name for j in candidates[:4])
            raise CheckpointExportError(
                f"{str(path)!r} records no parameter names, and optimizer parameter {i} (shape "
                f"{list(_first_shape(state[order[i]]))}) matches {len(candidates)} state_dict entries by order and "
                f"shape ({shown}); refusing to guess which weight its compensation belongs to. Re-save the checkpoint "
                "with this version of lightning_precision (it records the parameter names)."
            )
        names.append(entries[candidates[0]].name if len(candidates) == 1 else None)
    return names


class DistributedReader:
    """A distributed checkpoint directory (``FSDP2Strategy`` / ``ModelParallelStrategy``), read on one process.

    Args:
        path: The checkpoint directory.

    Raises:
        CheckpointExportError: If it has no DCP metadata, or shard files it lists are missing.
    """

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        if not (path / _DCP_METADATA).is_file():
            raise CheckpointExportError(
                f"{str(path)!r} is a directory without a {_DCP_METADATA!r} file: not a distributed checkpoint."
            )
        self._reader = FileSystemReader(str(path))
        try:
            metadata = self._reader.read_metadata()
        except Exception as err:  # a truncated or foreign pickle: any error means the same to the user
            raise CheckpointExportError(f"{str(path)!r}: cannot read {_DCP_METADATA!r} ({err}).") from None
        missing = sorted({info.relative_path for info in (metadata.storage_data or {}).values()} - _files(path))
        if missing:
            raise CheckpointExportError(
                f"distributed checkpoint {str(path)!r} is incomplete: shard file(s) {', '.join(missing)} are missing."
            )
        self.contract = _lightning_metadata(path).get(CHECKPOINT_KEY)
        tensors = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._tensors = tensors
        paths = {k: tuple(str(p) for p in metadata.planner_data.get(k, (k,))) for k in tensors}
        model_root = "state_dict" if any(p[0] == "state_dict" for p in paths.values()) else None
        self._keys: dict[str, str] = {}  # state-dict name -> DCP key
        self._extra: dict[str, tuple[str, str]] = {}  # name -> (DCP key, kind)
        optimizer_state: dict[str, dict[str, str]] = {}
        for key, p in paths.items():
            if (model_root and p[0] == model_root and len(p) > 1) or (model_root is None and len(p) == 1):
                self._keys[".".join(p[1:] if model_root else p)] = key
            elif p[0].startswith("optimizer") and len(p) >= 4 and p[1] == "state":
                optimizer_state.setdefault(".".join(p[2:-1]), {})[p[-1]] = key
        self.entries = []
        for name, key in self._keys.items():
            meta = tensors[key]
            shape, dtype = tuple(meta.size), meta.properties.dtype
            kind = self._find_extra(name, shape, dtype, optimizer_state.get(name, {}), tensors)
            self.entries.append(WeightEntry(name, shape, dtype, kind))
        if not self.entries:
            raise CheckpointExportError(f"distributed checkpoint {str(path)!r} holds no model tensors.")

    def _find_extra(self, name: str, shape: tuple, dtype: torch.dtype, keys: dict[str, str], tensors: dict) -> str:
        comp = keys.get(COMPENSATION_KEY)
        if comp and tuple(tensors[comp].size) == shape and tensors[comp].properties.dtype == dtype:
            self._extra[name] = (comp, "compensated")
            return "compensated"
        for k in MASTER_KEYS:
            master = keys.get(k)
            if master and _numel(tuple(tensors[master].size)) == _numel(shape):
                mdtype = tensors[master].properties.dtype
                if mdtype.is_floating_point and mdtype.itemsize >= 4:
                    self._extra[name] = (master, "master")
                    return "master"
        return "stored"

    def _load(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.api import CheckpointException

        meta = self._tensors[key]
        out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                load({key: out}, storage_reader=self._reader, no_dist=True)
        except CheckpointException as err:  # derives from BaseException: name it, or it escapes every handler
            raise CheckpointExportError(
                f"distributed checkpoint {str(self.path)!r}: cannot load {key!r} ({err})."
            ) from None
        return out

    def exact(self, entry: WeightEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored tensor and its most exact value (``p + c`` in fp32, the master copy, or the stored tensor)."""
        stored = self._load(self._keys[entry.name])
        extra = self._load(self._extra[entry.name][0]) if entry.name in self._extra else None
        return stored, _exact(stored, entry.exact_from, extra)

    def release(self) -> None:
        """Nothing to release: each tensor is read into its own buffer."""


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file()}


def _lightning_metadata(path: Path) -> dict[str, Any]:
    """Lightning's non-tensor part of a sharded checkpoint (contract, loop state), ``{}`` when absent."""
    meta = path / _LIGHTNING_METADATA
    if not meta.is_file():
        return {}
    try:
        data = torch.load(meta, map_location="cpu", weights_only=True)
    except Exception:  # hyperparameters that weights_only refuses: the tensors are still readable
        return {}
    return data if isinstance(data, dict) else {}
