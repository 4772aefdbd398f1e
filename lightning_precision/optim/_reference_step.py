"""The whole-tensor (``implementation="reference"``) step of :class:`~lightning_precision.optim.CompensatedAdamW`, and
the per-tensor step scalars and rounding streams that both steps use.

The reference step holds fp32 copies of all of a bucket's gradients, moments, parameters and compensations at once;
the chunked step (``_compensated_step``) applies the same ops to bounded chunks and is checked against this one. It
also steps the tensors the chunked step cannot take (DTensors whose placements differ from their state's).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_precision.optim import _chunk_plan, _compensated_step, _nonfinite
from lightning_precision.optim._stochastic_rounding import element_layout, round_into_, streams_for


def step_scalars(
    group: dict[str, Any], counts: list[float], device: torch.device, *, unbind: bool = True
) -> tuple[Any, Any]:
    """Per-tensor ``-lr / bc1`` and ``sqrt(bc2)`` of the step counts ``counts`` (as :func:`advance_steps` returns
    them) as 0-dim fp32 tensors on ``device`` (``unbind=False``: as two 1-D tensors, one element per tensor;
    unbinding thousands of tensors is slow).
    """
    beta1, beta2 = group["betas"]
    t = torch.tensor(counts, dtype=torch.float64)
    neg_step_size = (-group["lr"] / (1.0 - torch.pow(beta1, t))).to(torch.float32)
    bc2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt().to(torch.float32)
    if device.type != "cpu":
        both = torch.stack([neg_step_size, bc2_sqrt]).to(device, non_blocking=True)
        neg_step_size, bc2_sqrt = both[0], both[1]
    if not unbind:
        return neg_step_size, bc2_sqrt
    return neg_step_size.unbind(), bc2_sqrt.unbind()


def advance_steps(steps: list[torch.Tensor]) -> list[float]:
    """Add one to each step count in place; return the new counts (one host read: the counts are CPU tensors).

    The counts are written by one ``torch._foreach_copy_`` per distinct new count (tensors normally share one): on
    CPU a ``torch._foreach_add_`` over thousands of 0-dim tensors costs a few microseconds per tensor, a copy from
    one source a fraction of that.
    """
    advanced = torch.stack(steps).add_(1.0)  # the add of each count's own dtype, as an in-place add would give
    counts = advanced.tolist()
    by_value: dict[float, list[torch.Tensor]] = {}
    for step, value in zip(steps, counts):
        by_value.setdefault(value, []).append(step)
    for value, same in by_value.items():
        source = torch.tensor(value, dtype=advanced.dtype, device=advanced.device)
        torch._foreach_copy_(same, [source] * len(same))
    return counts


def state_rounding(
    param_groups: list[dict[str, Any]], group: dict[str, Any], owners: list[torch.Tensor], counts: list[float]
) -> _compensated_step.StateRounding:
    """Random-bit streams for the group's moments set to stochastic rounding, at the step counts ``counts`` (as
    :func:`advance_steps` returns them).

    The parameter's index counts over all groups in order: the same on every rank and for every world size.
    """
    moments = [m for m in ("exp_avg", "exp_avg_sq") if group[f"{m}_rounding"] == "stochastic"]
    if not moments:
        return _compensated_step.StateRounding()
    index_of = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
    layouts = [element_layout(p) for p in owners]
    step_values = [int(count) for count in counts]
    indices = [index_of[id(p)] for p in owners]
    streams = {m: streams_for(layouts, group["rounding_seed"], step_values, indices, m) for m in moments}
    return _compensated_step.StateRounding(**streams)


def step_reference_bucket(param_groups, group, device, half, bucket, owners, finite) -> None:
    """One bucket of :class:`CompensatedAdamW` (``implementation="reference"``, or tensors without flat views).

    ``bucket`` is ``(params, grads, exp_avgs, exp_avg_sqs, steps, comps)``; ``finite`` the per-tensor flags on an
    accelerator (None on CPU, where skipped tensors were taken out before).
    """
    params, grads, exp_avgs, exp_avg_sqs, steps, comps = bucket
    guarded = [params, exp_avgs, exp_avg_sqs] + ([comps] if half else [])
    saved = None if finite is None else _nonfinite.snapshot(guarded)
    counts = advance_steps(steps)
    scalars = step_scalars(group, counts, device)
    if half:
        rounding = state_rounding(param_groups, group, owners, counts)
        step_compensated(group, params, grads, exp_avgs, exp_avg_sqs, comps, scalars, rounding)
    else:
        step_plain(group, params, grads, exp_avgs, exp_avg_sqs, scalars)
    if saved is not None:  # accelerators: put back the tensors whose gradient was not finite
        _nonfinite.restore(guarded, saved, finite)


def step_plain(group, params, grads, exp_avgs, exp_avg_sqs, scalars) -> None:
    """torch.optim.AdamW for fp32/fp64 parameters (state in the parameter dtype)."""
    beta1, beta2 = group["betas"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    neg_step_size, bc2_sqrt = scalars
    if group["weight_decay"] != 0:
        torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, group["eps"])
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, neg_step_size)
    torch._foreach_add_(params, update)


def step_compensated(group, params, grads, exp_avgs, exp_avg_sqs, comps, scalars, rounding) -> None:
    """AdamW in fp32 arithmetic with a Kahan-compensated write into half-precision params."""
    beta1, beta2 = group["betas"]
    f32 = torch.float32
    g32 = [g.to(f32) for g in grads]
    if group["maximize"]:
        torch._foreach_neg_(g32)
    neg_step_size, bc2_sqrt = scalars

    # .to(f32) returns the state tensor itself when it is already fp32, so it updates in place.
    m32 = [m.to(f32) for m in exp_avgs]
    v32 = [v.to(f32) for v in exp_avg_sqs]
    hyper = _compensated_step.Hyper(1.0 - beta1, beta2, 1.0 - beta2, group["eps"], 0.0, False, False)
    _compensated_step.update_moments_(_compensated_step._FOREACH_OPS, m32, v32, g32, hyper)
    del g32
    # copy_ per tensor: DTensor has no sharding rule for _foreach_copy_.
    for stored, fp32, streams in ((exp_avgs, m32, rounding.exp_avg), (exp_avg_sqs, v32, rounding.exp_avg_sq)):
        for i, (dst, src) in enumerate(zip(stored, fp32)):
            if dst is src:
                continue
            if streams is None:
                dst.copy_(src)
            else:
                write_stochastically(dst, src, streams[i])

    denom = _compensated_step._FOREACH_OPS.sqrt(v32)
    del v32
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, group["eps"])
    update = torch._foreach_div(m32, denom)
    del m32, denom
    torch._foreach_mul_(update, neg_step_size)

    p32 = [p.to(f32) for p in params]
    c32 = [c.to(f32) for c in comps]
    if group["weight_decay"] != 0:
        # Decay the compensated value p + c, not just the rounded p.
        decay = torch._foreach_add(p32, c32)
        torch._foreach_mul_(decay, -group["lr"] * group["weight_decay"])
        torch._foreach_add_(update, decay)
        del decay
    torch._foreach_add_(update, c32)  # y = c + update
    del c32
    torch._foreach_add_(p32, update)  # t = p + y, exact enough in fp32
    del update
    for p, t in zip(params, p32):
        p.copy_(t)  # round to nearest
    torch._foreach_sub_(p32, params)  # low bits lost by the write
    for c, r in zip(comps, p32):
        c.copy_(r)


def write_stochastically(dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
    """The reference step's stochastic write of a whole (possibly DTensor) moment, through its local data."""
    flat = _chunk_plan.flat_local_views([dst, src])
    if flat is None:
        raise RuntimeError(
            "CompensatedAdamW: stochastic rounding needs a moment whose local data lines up with its fp32 value; got "
            f"tensors of shapes {tuple(dst.shape)} and {tuple(src.shape)} with different layouts or placements"
        )
    local_dst, local_src = flat
    scratch = torch.empty(local_src.numel(), dtype=torch.int32, device=local_src.device)
    round_into_(local_dst, local_src, stream, 0, scratch)
