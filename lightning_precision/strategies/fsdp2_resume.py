"""Resuming :class:`~lightning_precision.strategies.FSDP2Strategy`: every saved tensor is read in the dtype it was saved
in, then converted for the run that resumes, checked on every rank, and the storage change is reported.

Why not Lightning's ``ModelParallelStrategy`` loading: it reads a checkpoint into the resuming run's own tensors, so
each saved tensor is cast to whatever that run holds. A CompensatedAdamW compensation has no place in an fp32 run and
is dropped (the weight loses the bits it carried), fp32 weights narrowed into bf16 storage lose their low bits with no
compensation to keep them, a state with other keys (torch AdamW resumed by CompensatedAdamW) fails inside
``torch.distributed.checkpoint``, and corrupt values load silently. Here:

- The saved dtypes are those of the tensors themselves (the DCP metadata of a sharded checkpoint, the tensors of a
  full file); the strategy's metadata entry is only compared with them, and a disagreement is warned about.
- Weights go into the model cast to its storage dtype, as Lightning does. Where storage narrows and a compensated
  optimizer will hold the parameter, the full-precision values are kept for the optimizer load, which seeds the
  compensation with their residual.
- Optimizer state is read in its saved dtypes, laid out like each parameter's shards, checked (shapes from the saved
  metadata, values with one collective, so every rank reaches the same verdict) and handed to the optimizer's own
  ``load_state_dict``. CompensatedAdamW converts it itself (``optim/_compensated_state.py``); for another optimizer
  a saved compensation is folded into parameters that are now wider, and the resume refused where they are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load
from lightning.fabric.strategies.model_parallel import (
    _is_full_checkpoint,
    _is_sharded_checkpoint,
    _load_raw_module_state,
    _rekey_optimizer_state_if_needed,
)
from lightning.fabric.utilities.load import _METADATA_FILENAME
from torch import nn

from lightning_precision._logging import warn_once
from lightning_precision.dtypes import HALF_DTYPES, dtype_name, parse_dtype
from lightning_precision.errors import OptimizerStateError
from lightning_precision.optim._compensated_state import (
    compensated_bits,
    mantissa_bits,
    source_name,
)
from lightning_precision.report import report_storage_change
from lightning_precision.resumed_state import (
    check_loaded_state,
    fold_saved_compensation,
    is_compensated,
    require_moments,
)


def load_resume_checkpoint(strategy: Any, checkpoint_path: Any, key: str, weights_only: bool | None) -> dict[str, Any]:
    """Load a sharded directory or full file into ``strategy``'s model and optimizers (see the module docstring).

    Args:
        strategy: The FSDP2 strategy, set up (model sharded, optimizers created when fitting).
        checkpoint_path: The checkpoint, as given to ``Trainer.fit(ckpt_path=...)``.
        key: Where the strategy records its dtype plan in the checkpoint.
        weights_only: Passed to ``torch.load`` for the non-tensor part.

    Returns:
        The rest of the checkpoint (everything but the weights), as Lightning's loading returns it.

    Raises:
        OptimizerStateError: If a saved optimizer state is corrupt (nan/inf, a negative ``exp_avg_sq`` or step, a
            shape other than its parameter's), lacks what the optimizer needs, or holds a compensation that the
            resuming optimizer cannot use; the message names the tensor or both optimizers, and the fix.
        ValueError: If the path is neither a sharded checkpoint directory nor a checkpoint file.
    """
    path = Path(strategy.broadcast(checkpoint_path))
    module = strategy.model
    params = params_by_fqn(module)
    reader = _reader(path, module, weights_only)
    saved = reader.weight_dtypes()
    changes = {fqn: (saved[fqn], p.dtype) for fqn, p in params.items() if fqn in saved and saved[fqn] != p.dtype}
    optimizers = [getattr(o, "_optimizer", o) for o in strategy.optimizers]
    compensated = {id(p) for o in optimizers if is_compensated(o) for g in o.param_groups for p in g["params"]}
    seeded = {
        fqn for fqn, (before, after) in changes.items()
        if after in HALF_DTYPES and before.itemsize > after.itemsize and id(params[fqn]) in compensated
    }  # fmt: skip
    wide = reader.load_weights(strategy.lightning_module.strict_loading, seeded, params)
    for index, optimizer in enumerate(optimizers):
        state = reader.optimizer_state(index, _Layout(strategy.model, optimizer, params, path))
        _load_optimizer_state(optimizer, state, params, {params[f]: v for f, v in wide.items()}, strategy, path)
    metadata = reader.metadata()
    _report(strategy, (metadata.get(key) or {}).get("storage_dtype"), changes, seeded, saved, params, path)
    return metadata


def params_by_fqn(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters by the names ``torch.distributed.checkpoint`` saves them under."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    return {next(iter(_get_fqns(module, name))): p for name, p in module.named_parameters()}


def _reader(path: Path, module: nn.Module, weights_only: bool | None) -> _ShardedCheckpoint | _FullCheckpoint:
    if _is_sharded_checkpoint(path):
        return _ShardedCheckpoint(path, module, weights_only)
    if _is_full_checkpoint(path):
        return _FullCheckpoint(path, module, weights_only)
    raise ValueError(
        f"The path {str(path)!r} does not point to a valid checkpoint. Make sure the path points to either a "
        "directory with distributed checkpoint shards, or a single file with a full checkpoint."
    )


def _state_key(rest: str) -> tuple[str, str]:
    fqn, _, name = rest.rpartition(".")
    return fqn, name


class _Layout:
    """Where each saved optimizer tensor goes on this rank: the optimizer's own state tensor when the saved one has
    its shape and dtype (any optimizer's state loads as Lightning would load it), else a tensor of the saved dtype
    laid out like the parameter (a state of another dtype or optimizer, read without a cast)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, params: Mapping[str, Any], path: Path):
        from torch.distributed.checkpoint.state_dict import _init_optim_state, get_optimizer_state_dict

        _init_optim_state(optimizer)  # a step with zero gradients and lr 0 creates the state, as torch's loading does
        self.own = get_optimizer_state_dict(module, optimizer)["state"]
        self.params, self.path = params, path

    def target(self, fqn: str, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor a saved ``state[name]`` of ``fqn`` is read into: the optimizer's own, one shaped like the
        parameter in the saved dtype, or ``None`` for a plain tensor (a scalar such as ``step``).

        Raises:
            OptimizerStateError: If the shape fits neither the optimizer's own tensor nor the parameter, or the
                model has no parameter ``fqn``.
        """
        mine = self.own.get(fqn, {}).get(name)
        param = self.params.get(fqn)
        if isinstance(mine, torch.Tensor) and tuple(mine.shape) == shape and mine.dtype == dtype:
            return mine
        if param is not None and tuple(param.shape) == shape and name != "step":
            return torch.empty_like(param, dtype=dtype)
        if not shape:
            return None
        if param is None:
            raise OptimizerStateError(
                f"The optimizer state in {self.path} holds state[{name!r}] of {fqn!r}, which this model does not "
                "have: the checkpoint belongs to another model."
            )
        expected = tuple(mine.shape) if isinstance(mine, torch.Tensor) else tuple(param.shape)
        raise OptimizerStateError(
            f"The optimizer state in {self.path} does not fit the model: state[{name!r}] of {fqn} has shape {shape}, "
            f"the optimizer keeps {expected} for that parameter of shape {tuple(param.shape)}. The checkpoint belongs "
            "to another model; resume from one of this model, or load only the weights."
        )


class _ShardedCheckpoint:
    """A DCP directory: the dtypes and shapes of the tensors come from its metadata, each rank reads its shards."""

    def __init__(self, path: Path, module: nn.Module, weights_only: bool | None) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path, self.module, self.weights_only = path, module, weights_only
        self.entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata

    def weight_dtypes(self) -> dict[str, torch.dtype]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        prefix = "state_dict."
        return {
            k[len(prefix) :]: md.properties.dtype
            for k, md in self.entries.items()
            if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)
        }

    def load_weights(self, strict: bool, keep: set[str], params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module)
        dtypes = self.weight_dtypes()
        wide = {fqn: torch.empty_like(state[fqn], dtype=dtypes[fqn]) for fqn in keep}
        _distributed_checkpoint_load({"state_dict": {**state, **wide}}, self.path)
        with torch.no_grad():
            for fqn, value in wide.items():
                state[fqn].copy_(value)  # rounded to the storage dtype, as a cast on load would
        self.module.load_state_dict(state, strict=strict)
        return wide

    def optimizer_state(self, index: int, layout: _Layout) -> dict[str, Any]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        prefix = f"optimizer_{index}."
        template: dict[str, Any] = {}
        for key, md in self.entries.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if rest.startswith("state.") and isinstance(md, TensorStorageMetadata):
                target = layout.target(*_state_key(rest[len("state.") :]), tuple(md.size), md.properties.dtype)
                template[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype) if target is None else target
            else:
                template[key] = None  # non-tensor values (param groups) are read whole
        _distributed_checkpoint_load(template, self.path)
        state: dict[str, dict[str, Any]] = {}
        groups: dict[int, dict[str, Any]] = {}
        for key, value in template.items():
            rest = key[len(prefix) :]
            if rest.startswith("state."):
                fqn, name = _state_key(rest[len("state.") :])
                state.setdefault(fqn, {})[name] = value
            else:
                _, group, name = rest.split(".", 2)
                groups.setdefault(int(group), {})[name] = value
        return {"state": state, "param_groups": [groups[i] for i in sorted(groups)]}

    def metadata(self) -> dict[str, Any]:
        return torch.load(self.path / _METADATA_FILENAME, weights_only=self.weights_only)


class _FullCheckpoint:
    """One file with full tensors, read by every rank (memory-mapped); each rank keeps its shards of the state."""

    def __init__(self, path: Path, module: nn.Module, weights_only: bool | None) -> None:
        self.path, self.module = path, module
        self.checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)

    def weight_dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def _shard(full: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
        """This rank's part of ``full``, laid out like ``like`` (every rank holds the full tensor: no communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if like is None:
            return full
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(like.device)

    def load_weights(self, strict: bool, keep: set[str], params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        weights = self.checkpoint.pop("state_dict")
        wide = {fqn: self._shard(weights[fqn], params[fqn]) for fqn in keep}
        _load_raw_module_state(weights, self.module, strict=strict)
        return wide

    def optimizer_state(self, index: int, layout: _Layout) -> dict[str, Any]:
        osd = _rekey_optimizer_state_if_needed(self.checkpoint["optimizer_states"][index], self.module)
        state = {
            fqn: {
                k: self._shard(v, layout.target(fqn, k, tuple(v.shape), v.dtype)) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }
            for fqn, saved in osd["state"].items()
        }
        return {"state": state, "param_groups": [dict(g) for g in osd["param_groups"]]}

    def metadata(self) -> dict[str, Any]:
        return self.checkpoint


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    osd: dict[str, Any],
    params: Mapping[str, torch.Tensor],
    wide: dict[torch.Tensor, torch.Tensor],
    strategy: Any,
    path: Path,
) -> None:
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    source = source_name(osd["param_groups"], osd["state"])
    check_loaded_state(osd["state"], name, path, strategy.root_device)
    by_index = _keyed_by_index(optimizer, osd, params, name)
    if is_compensated(optimizer):
        mine = {p: v for p, v in wide.items() if any(p is q for g in optimizer.param_groups for q in g["params"])}
        optimizer.load_state_dict(by_index, full_precision_params=mine)  # converts, seeds and checks itself
        unsaved = {p: v for p, v in mine.items() if "compensation" not in optimizer.state.get(p, {})}
        if unsaved:  # saved before their first step: a fresh state, its compensation the residual all the same
            optimizer.seed_compensation_from(unsaved)
        return
    require_moments(optimizer, osd["state"], name, source)
    fold_saved_compensation(optimizer, by_index, osd["state"], params, name, source)
    optimizer.load_state_dict(by_index)


def _keyed_by_index(
    optimizer: torch.optim.Optimizer, osd: dict[str, Any], params: Mapping[str, torch.Tensor], who: str
) -> dict[str, Any]:
    """The state keyed as ``Optimizer.load_state_dict`` takes it: by the position of each parameter in this
    optimizer's groups."""
    fqn_of = {id(p): fqn for fqn, p in params.items()}
    saved_groups = osd["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise OptimizerStateError(
            f"{who}: the checkpoint has {len(saved_groups)} param groups, the optimizer {len(optimizer.param_groups)}; "
            "create the optimizer with the groups it was saved with."
        )
    state, groups, offset = {}, [], 0
    for gi, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        names = [fqn_of[id(p)] for p in group["params"]]
        if sorted(saved.get("params", [])) != sorted(names):
            missing = sorted(set(names) - set(saved.get("params", [])))
            raise OptimizerStateError(
                f"{who}: param group {gi} was saved with other parameters than it has now (not saved: {missing[:3]}); "
                "create the optimizer with the groups it was saved with."
            )
        groups.append({**saved, "params": list(range(offset, offset + len(names)))})
        state.update({offset + i: osd["state"][n] for i, n in enumerate(names) if n in osd["state"]})
        offset += len(names)
    return {"state": state, "param_groups": groups}


def _report(
    strategy: Any,
    recorded: Any,
    changes: Mapping[str, tuple[torch.dtype, torch.dtype]],
    seeded: set[str],
    saved: Mapping[str, torch.dtype],
    params: Mapping[str, torch.Tensor],
    path: Path,
) -> None:
    """Say what the resume did to the storage dtype, from the tensors loaded; warn if the metadata disagrees."""
    what = f"{type(strategy).__name__} checkpoint from {path}"
    pairs: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for fqn, pair in changes.items():
        pairs.setdefault(pair, []).append(fqn)
    for (before, after), fqns in pairs.items():
        kept = None
        if seeded.issuperset(fqns):
            kept = (
                f"the parameters were rounded to {dtype_name(after)} on load and CompensatedAdamW keeps their residual "
                f"in its compensation, so p + compensation holds about {compensated_bits(after)} of "
                f"{dtype_name(before)}'s {mantissa_bits(before)} mantissa bits "
                "(the rest, and the moment bits beyond the dtypes CompensatedAdamW keeps them in, were rounded away)"
            )
        report_storage_change(before, after, what=what, kept=kept)
    if recorded in (None, "-") or strategy.storage_dtype is None:
        return
    stored = {saved[f] for f, p in params.items() if f in saved and p.dtype == strategy.storage_dtype}
    recorded_dtype = parse_dtype(recorded, what="checkpoint storage_dtype")
    if stored and stored != {recorded_dtype}:
        warn_once(
            f"resume-metadata:{path}",
            f"{what}: its metadata records storage_dtype={recorded!r}, but its weights are stored in "
            f"{', '.join(sorted(dtype_name(d) for d in stored))}. The weights were loaded as they are and the storage "
            "change reported from them; the metadata was edited or written by another run.",
        )
