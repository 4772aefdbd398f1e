"""Optimizer state read back from a checkpoint: checked, and converted where the optimizer that resumes is not the
one that saved it (issue-tracker words: a switched optimizer on resume).

Shared by :mod:`~lightning_precision.strategies.fsdp2_resume` (sharded, every rank) and the single-process Trainer
(:func:`check_trainer_resume`, asked by ``PrecisionGuard`` at fit start, before Lightning loads the state):

- a state with nan/inf values, or a negative ``exp_avg_sq`` or step, is refused naming each tensor;
- torch Adam/AdamW resuming a state without its moments (SGD's) is refused naming both optimizers;
- a ``CompensatedAdamW`` state resumed by another optimizer has its compensation folded into parameters that are now
  wider (``p + c``); where they are still half precision the resume is refused, since the other optimizer has no place
  for those bits;
- ``CompensatedAdamW`` resuming parameters that were fp32 when saved and are now half gets, for each, the residual of
  the checkpoint's fp32 weight as its compensation, not zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_precision._logging import info_rank_zero
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import OptimizerStateError
from lightning_precision.optim._compensated_state import (
    REQUIRED_KEYS,
    compensated_bits,
    fold_into_parameters,
    residual,
    source_name,
)
from lightning_precision.optim._dtensor import local_tensor
from lightning_precision.report import report_storage_change

_NON_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "step")


def is_compensated(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` converts a resumed state itself (``CompensatedAdamW`` and optimizers built like it)."""
    return bool(getattr(optimizer, "compensated_update", False)) and hasattr(optimizer, "seed_compensation_from")


def check_trainer_resume(
    optimizers: Sequence[torch.optim.Optimizer],
    saved_states: Sequence[dict[str, Any]],
    weights: Mapping[str, Any],
    names: Mapping[int, str],
    path: Any,
) -> None:
    """Check and convert, in place, the optimizer states a single-process Trainer is about to load.

    Args:
        optimizers: The run's optimizers (``trainer.optimizers``).
        saved_states: The checkpoint's ``optimizer_states``, one per optimizer; changed in place.
        weights: The checkpoint's ``state_dict`` (the weights as saved), by parameter name.
        names: Parameter name by ``id`` of the run's parameters.
        path: The checkpoint, for messages.

    Raises:
        OptimizerStateError: See the module docstring.
    """
    for optimizer, osd in zip(optimizers, saved_states):
        if not isinstance(osd, Mapping) or not isinstance(osd.get("state"), Mapping):
            continue
        who = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        params = [p for g in optimizer.param_groups for p in g["params"]]
        label = {i: names.get(id(p), f"parameter {i}") for i, p in enumerate(params)}
        state = {label.get(k, f"parameter {k}"): v for k, v in osd["state"].items() if isinstance(v, dict)}
        check_loaded_state(state, who, Path(str(path)), None)  # the whole file on every rank: no collective
        if is_compensated(optimizer):
            _seed_narrowed(optimizer, osd, params, label, weights, who)
            continue
        source = source_name(osd.get("param_groups", []), osd["state"])
        require_moments(optimizer, state, who, source)
        by_label = {label[i]: p for i, p in enumerate(params)}
        fold_saved_compensation(optimizer, osd, state, by_label, who, source)


def report_weight_changes(weights: Mapping[str, Any], module: torch.nn.Module, path: Any) -> None:
    """Say what a resume did to the storage of the trainable parameters, judged from the checkpoint's own tensors
    (for a checkpoint that stores no precision contract: plain Lightning, or saved without ``PrecisionGuard``)."""
    pairs: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for name, param in module.named_parameters():
        saved = weights.get(name)
        if param.requires_grad and isinstance(saved, torch.Tensor) and saved.is_floating_point():
            if saved.dtype != param.dtype:
                pairs.setdefault((saved.dtype, param.dtype), []).append(name)
    for (before, after), names in pairs.items():
        what = f"parameters ({len(names)}, first: {names[0]}) of {path}, which stores no precision contract,"
        report_storage_change(before, after, what=what)


def _seed_narrowed(
    optimizer: Any, osd: Mapping[str, Any], params: list, label: Mapping[int, str], weights: Mapping[str, Any], who: str
) -> None:
    """A half parameter whose saved state has no compensation, and whose checkpoint weight is wider, gets the residual
    of that weight as its compensation (``CompensatedAdamW.load_state_dict`` then keeps it)."""
    seeded = []
    for index, tensors in osd["state"].items():
        if not isinstance(index, int) or index >= len(params) or not isinstance(tensors, dict):
            continue
        param, saved = params[index], weights.get(label[index])
        if "compensation" in tensors or param.dtype not in HALF_DTYPES or not isinstance(saved, torch.Tensor):
            continue
        if saved.dtype.itemsize <= param.dtype.itemsize:
            continue
        tensors["compensation"] = residual(param, saved, param.dtype, index, who)
        seeded.append(label[index])
    if seeded:
        info_rank_zero(
            f"{who}: the checkpoint's weights are wider than the {dtype_name(params[0].dtype)} parameters of this run; "
            f"the compensation of {len(seeded)} parameter(s) (first: {seeded[0]}) holds the residual of the saved "
            f"weights, so p + compensation keeps about {compensated_bits(params[0].dtype)} of their mantissa bits."
        )


def check_loaded_state(
    state: Mapping[str, Mapping[str, Any]], who: str, path: Path, device: torch.device | None
) -> None:
    """Refuse a loaded state with nan/inf values or a negative ``exp_avg_sq``/step, naming every such tensor.

    Each rank flags its own shards; one all-reduce on ``device`` adds the flags, so every rank raises (or goes on)
    together. ``device=None``: no collective, for a state every rank read whole from the same file.

    Raises:
        OptimizerStateError: Naming each corrupt tensor by its key and parameter.
    """
    names, flags = [], []
    for fqn, tensors in state.items():
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            t = local_tensor(value)
            negative = (t < 0).any() if key in _NON_NEGATIVE else torch.zeros((), dtype=torch.bool, device=t.device)
            names.append(f"state[{key!r}] of {fqn}")
            flags.append(
                torch.stack([~torch.isfinite(t).all(), negative]).to(device=device or "cpu", dtype=torch.int32)
            )
    if not flags:
        return
    found = torch.stack(flags)
    if device is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(found)
    bad = [
        f"{what} holds {'nan/inf' if nonfinite else 'negative'} values"
        for what, (nonfinite, negative) in zip(names, found.tolist())
        if nonfinite or negative
    ]
    if bad:
        raise OptimizerStateError(
            f"{who}: the optimizer state loaded from {path} is corrupt: {'; '.join(bad)}. The checkpoint was saved "
            "after the state diverged or was damaged: resume from an earlier checkpoint, or load only the model weights."
        )


def require_moments(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Mapping[str, Any]], who: str, src: str
) -> None:
    """An Adam-family torch optimizer needs its moments: a state without them (SGD's) is refused."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    needed = (*REQUIRED_KEYS, "max_exp_avg_sq") if amsgrad else REQUIRED_KEYS
    for fqn, tensors in state.items():
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise OptimizerStateError(
                f"{who} cannot resume the optimizer state saved by {src}: the state of {fqn} has {sorted(tensors)} "
                f"but lacks {missing}. Resume with {src}, or load only the model weights (drop the optimizer state)."
            )


def fold_saved_compensation(
    optimizer: torch.optim.Optimizer,
    by_index: dict[str, Any],
    state: Mapping[str, dict[str, Any]],
    params: Mapping[str, torch.Tensor],
    who: str,
    source: str,
) -> None:
    """A CompensatedAdamW state resumed by another optimizer: its compensation is folded into parameters that are now
    wider (``p + c``), and its own group options dropped; where the parameters are still half precision the other
    optimizer has no place for the compensation, and the resume is refused."""
    items = [(fqn, tensors["compensation"]) for fqn, tensors in state.items() if "compensation" in tensors]
    if not items:
        return
    narrow = [fqn for fqn, comp in items if params[fqn].dtype.itemsize <= comp.dtype.itemsize]
    if narrow:
        dtype = dtype_name(params[narrow[0]].dtype)
        raise OptimizerStateError(
            f"{who} cannot resume the state saved by {source} for its {dtype} parameters ({narrow[0]} and "
            f"{len(narrow) - 1} more): the saved compensation holds the low bits of every weight, and {who} has no "
            f"place for it. Resume with {source}, or with fp32 storage (precision='bf16-mixed'; under FSDP2, "
            "FSDP2Strategy(storage_dtype='float32')), where the compensation is folded into the parameters."
        )
    order = list(params)
    fold_into_parameters([(order.index(f), params[f], state[f].pop("compensation")) for f, _ in items], who)
    known = set(optimizer.param_groups[0]) if optimizer.param_groups else set()
    for group in by_index["param_groups"]:
        for option in [k for k in group if k not in known]:
            del group[option]  # the saved optimizer's options (exp_avg_dtype, ...) mean nothing here
    info_rank_zero(
        f"{who}: resumed the state saved by {source}; the moments were carried over in {who}'s dtypes and the "
        "compensation folded into the parameters (see the line above)."
    )
