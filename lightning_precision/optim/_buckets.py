"""Which tensors one step of :class:`~lightning_precision.optim.CompensatedAdamW` takes, bucketed for its step paths.

Built afresh at every step (nothing cached across steps: a parameter that gains or loses a gradient, changes dtype,
gets a loaded state or a new group is seen as it is now), with the per-parameter work kept small: a model of 5,000
tensors pays it 5,000 times per step. The state dtypes are resolved once per group and parameter dtype; a state
whose dtypes still match is taken as it is, anything else goes through the optimizer's ``_init_state``.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_precision.optim import _chunk_plan, _compensated_state

# One bucket: params, grads, exp_avgs, exp_avg_sqs, steps, comps, owners (the parameters), optimizer indices.
BUCKET_LISTS = 8


def collect(optimizer: Any) -> tuple[list[tuple[dict[str, Any], tuple, list[list]]], int]:
    """The tensors to step, by group and bucket, and the number of elements the chunked step takes.

    Tensors are bucketed by device and dtypes (each foreach call sees one dtype per list) and by whether the chunked
    step can take them: it needs flat local views, which a DTensor with mismatched placements does not have.

    Args:
        optimizer: A :class:`~lightning_precision.optim.CompensatedAdamW`.

    Returns:
        ``(group, key, bucket)`` triples, with ``key = (device, param dtype, exp_avg dtype, exp_avg_sq dtype,
        compensated, flat)`` and ``bucket`` the :data:`BUCKET_LISTS` lists; and the elements of the flat buckets.

    Raises:
        RuntimeError: On a sparse gradient or a complex parameter (from ``_init_state``).
    """
    work = []
    stepped_numel = 0
    index = 0
    states = optimizer.state
    for group in optimizer.param_groups:
        buckets: dict[tuple, list[list]] = {}
        dtypes_by_param_dtype: dict[torch.dtype, dict[str, torch.dtype]] = {}
        flat_wanted = group["implementation"] != "reference"
        for p in group["params"]:
            index += 1
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("CompensatedAdamW does not support sparse gradients")
            dtype = p.dtype
            dtypes = dtypes_by_param_dtype.get(dtype)
            if dtypes is None:
                dtypes = dtypes_by_param_dtype[dtype] = optimizer._state_dtypes_for(p, group)
            state = states.get(p)
            if state is None or "step" not in state or not _compensated_state.state_matches(state, dtypes):
                state = optimizer._init_state(p, group)
            exp_avg, exp_avg_sq, comp = state["exp_avg"], state["exp_avg_sq"], state.get("compensation")
            half = comp is not None
            tensors = [p, grad, exp_avg, exp_avg_sq, comp] if half else [p, grad, exp_avg, exp_avg_sq]
            flat = _chunk_plan.flat_local_views(tensors) if flat_wanted else None
            if flat is not None:
                tensors = flat
                stepped_numel += flat[0].numel()
            key = (p.device, dtype, exp_avg.dtype, exp_avg_sq.dtype, half, flat is not None)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = [[] for _ in range(BUCKET_LISTS)]
            params, grads, exp_avgs, exp_avg_sqs, steps, comps, owners, indices = bucket
            params.append(tensors[0])
            grads.append(tensors[1])
            exp_avgs.append(tensors[2])
            exp_avg_sqs.append(tensors[3])
            steps.append(state["step"])
            comps.append(tensors[4] if half else None)
            owners.append(p)
            indices.append(index - 1)
        work.extend((group, key, bucket) for key, bucket in buckets.items())
    return work, stepped_numel
