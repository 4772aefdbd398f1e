"""The update an optimizer intended for sampled elements, reconstructed in fp32 from its state after the step.

The optimizer catalogue says which formula applies (:attr:`~lightning_precision.catalogue.OptimizerInfo.update_formula`)
and how weight decay enters; this module holds the formulas. Only the size of the update matters (it decides whether
fp32 storage would have recorded it), so the Adam formula serves the Adam variants (NAdam, RAdam, ...) too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_precision.catalogue import OptimizerInfo, state_tensor
from lightning_precision.optim._dtensor import local_tensor


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of the sampled elements (``torch.take`` reads any layout as if flat, without copying it)."""
    t = (state_tensor(t) if not isinstance(t, torch.Tensor) else t).detach()
    if t.is_contiguous():  # index_select on the flat view is the faster gather
        return t.view(-1).index_select(0, idx).float()
    return torch.take(t, idx).float()


def _scalar(value: Any) -> float:
    return float(local_tensor(value)) if isinstance(value, torch.Tensor) else float(value)


def intended_update(
    info: OptimizerInfo,
    group: dict[str, Any],
    state: dict[str, Any],
    idx: torch.Tensor,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq_before: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The intended update of the sampled elements, and the intended change of ``exp_avg_sq``.

    Args:
        info: The optimizer as the catalogue classifies it.
        group: The parameter's group (learning rate, betas, weight decay as they were for this step).
        state: The parameter's optimizer state after the step.
        idx: Flat indices of the sampled elements in the local tensor.
        param: The sampled stored values before the step (fp32).
        grad: The sampled gradient (fp32).
        exp_avg_sq_before: The sampled second moment before the step, ``None`` before the first step.

    Returns:
        ``(update, exp_avg_sq change or None)``, or ``None`` when the optimizer's update cannot be reconstructed.
    """
    lr = _scalar(group.get("lr", 0.0))
    wd = _scalar(group.get("weight_decay", 0.0) or 0.0)
    decoupled = info.decoupled_weight_decay or any(bool(group.get(k)) for k in info.decoupled_keys)
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    if isinstance(exp_avg, torch.Tensor) and isinstance(exp_avg_sq, torch.Tensor) and "eps" in group:
        m = take(local_tensor(exp_avg), idx)
        v_key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        v = take(local_tensor(state[v_key]), idx)
        eps = _scalar(group["eps"])
        if info.update_formula == "adam-debiased":  # optimi keeps debiased moments
            beta2 = _scalar(group.get("beta2", 0.999))
            t = max(_scalar(group.get("step", state.get("step", 1))), 1.0)
            update = lr * m / (v.sqrt() + eps)
            beta2_comp = 1.0 - (beta2**t - beta2) / (beta2**t - 1.0) if t > 1 else 1.0
            wd_step = (
                wd * lr / _scalar(group["max_lr"]) if group.get("decouple_lr") and group.get("max_lr") else lr * wd
            )
        else:
            beta1, beta2 = (
                _scalar(b) for b in group.get("betas", (group.get("beta1", 0.9), group.get("beta2", 0.999)))
            )
            t = max(_scalar(state.get("step", group.get("step", 1))), 1.0)
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            update = (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
            beta2_comp = 1.0 - beta2
            wd_step = lr * wd
        if wd and decoupled:
            update = update + wd_step * param
        g = grad + wd * param if wd and not decoupled else grad  # L2 weight decay enters the gradient
        v_before = exp_avg_sq_before if exp_avg_sq_before is not None else torch.zeros_like(g)
        return update, beta2_comp * (g * g - v_before)
    if info.update_formula == "sgd":
        g = grad + wd * param if wd else grad
        momentum = _scalar(group.get("momentum", 0.0) or 0.0)
        buf = state.get("momentum_buffer")
        if momentum and isinstance(buf, torch.Tensor):
            b = take(local_tensor(buf), idx)
            return lr * (g + momentum * b if group.get("nesterov") else b), None
        return lr * g, None
    return None
