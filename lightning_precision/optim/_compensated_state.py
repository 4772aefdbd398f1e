"""Loading state into :class:`~lightning_precision.optim.CompensatedAdamW`: dtypes, storage changes, other optimizers.

A state is converted for the parameters it is loaded into, checked, and only then installed:

- Moments are stored in the dtypes this optimizer chooses for the parameter now (torch would cast them to the
  parameter dtype); ``step`` becomes a CPU fp32 tensor.
- Narrowing (no ``compensation`` saved, the parameter is now bf16/fp16: an fp32-storage run, or torch AdamW): the
  compensation starts at zero and a log line says that the weight's bits beyond the half dtype, if the saved run had
  them, were lost when the parameter was narrowed. :meth:`CompensatedAdamW.seed_compensation_from` restores them
  from the full-precision weights.
- Widening (a ``compensation`` saved, the parameter is now fp32/fp64): the compensation is added into the parameter
  and dropped, so the parameter becomes ``p + c`` computed in its dtype. The optimizer folds only a parameter whose
  every element is representable in the compensation's dtype, i.e. that still holds the rounded half-precision weight
  the compensation belongs to (Lightning loads the weights before the optimizer state). Nothing extra is stored: a
  trained or full-precision fp32 weight passes this test with probability 2**-16 per element, so a parameter that
  already holds more bits (weights saved as ``p + c``, or not loaded yet) is left alone and the log says the
  compensation was dropped.
- Every tensor is checked: finite, ``exp_avg_sq >= 0``, ``step >= 0``, shape equal to the parameter's; a state
  lacking ``exp_avg``/``exp_avg_sq``/``step`` (another optimizer, e.g. SGD) or an AMSGrad state is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_precision._logging import info_rank_zero
from lightning_precision.dtypes import dtype_name
from lightning_precision.errors import OptimizerStateError
from lightning_precision.optim._compensated_options import LAYOUT_OPTIONS
from lightning_precision.optim._dtensor import local_tensor

HALF_DTYPES = (torch.bfloat16, torch.float16)
REQUIRED_KEYS = ("step", "exp_avg", "exp_avg_sq")
# State whose dtype/device is chosen by this optimizer, not by the parameter. torch's load_state_dict would cast
# these to the param dtype, and alias (not copy) "step".
DTYPED_STATE_KEYS = (*REQUIRED_KEYS, "compensation")


def mantissa_bits(dtype: torch.dtype) -> int:
    """Significand bits of a float dtype, the implicit one included (8 for bfloat16, 24 for float32)."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 1


def compensated_bits(dtype: torch.dtype) -> int:
    """Significand bits that a half-precision ``p`` and its compensation ``c`` of ``dtype`` keep of a weight
    together: about twice the dtype's own (16 for bfloat16, 22 for float16)."""
    return 2 * mantissa_bits(dtype)


def source_name(groups: list[dict[str, Any]], state: dict[Any, Any]) -> str:
    """A guess at the optimizer that saved a state dict, for messages."""
    keys = {k for s in state.values() if isinstance(s, dict) for k in s}
    if any("exp_avg_sq_dtype" in g for g in groups):
        return "CompensatedAdamW"
    if any("amsgrad" in g for g in groups):
        return "torch.optim.AdamW (or Adam)"
    if "momentum_buffer" in keys:
        return "torch.optim.SGD"
    return "another optimizer"


def _fix() -> str:
    return (
        "resume with the optimizer that saved it, or start CompensatedAdamW fresh from the checkpoint's weights (load "
        "only the model weights, e.g. drop 'optimizer_states' from the Lightning checkpoint)"
    )


class StateLoader:
    """Converts and checks a state dict in a load_state_dict pre-hook, installs it in the post-hook."""

    def __init__(self, optimizer: Any, full_precision: Any = None) -> None:
        self.opt = optimizer
        # Saved parameter id -> (parameter, its index in optimizer order, group index, converted state).
        self.converted: dict[Any, tuple[torch.Tensor, int, int, dict[str, torch.Tensor]]] = {}
        self.fold: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.narrowed: list[int] = []
        self.seeded: list[int] = []
        # (moment, saved dtype, kept dtype) -> how many parameters' moments were rounded to a narrower dtype.
        self.moments_narrowed: dict[tuple[str, torch.dtype, torch.dtype], int] = {}
        # Group index -> the layout options the saved group brings that differ from the constructor's.
        self.layout_kept: dict[int, list[str]] = {}
        # id(parameter) -> the full-precision weight a narrowed state's compensation is seeded from.
        self.full_precision = {id(k): v for k, v in (full_precision or {}).items()}
        self.source = ""

    def pre_hook(self, optimizer: Any, sd: dict[str, Any]) -> dict[str, Any]:
        saved_groups = sd["param_groups"]
        groups = self.opt.param_groups
        if len(saved_groups) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups)
        ):
            return sd  # torch's load_state_dict raises its own error for this
        self.source = source_name(saved_groups, sd["state"])
        new_state = {}
        index = 0
        for gi, (saved, current) in enumerate(zip(saved_groups, groups)):
            if saved.get("amsgrad"):
                raise OptimizerStateError(
                    f"CompensatedAdamW cannot load the state of {self.source} with amsgrad=True (param group {gi}): "
                    f"it keeps max_exp_avg_sq, which CompensatedAdamW has no use for; {_fix()}"
                )
            merged = self.opt.group_after_load(saved, gi)
            kept = [f"{k}={merged[k]!r}" for k in LAYOUT_OPTIONS if k in current and merged[k] != current[k]]
            if kept:
                self.layout_kept[gi] = kept
            for k, param in zip(saved["params"], current["params"]):
                s = sd["state"].get(k)
                if isinstance(s, dict) and s:
                    self.converted[k] = (param, index, gi, self._convert(s, param, merged, index, gi))
                    s = {n: v for n, v in s.items() if n not in DTYPED_STATE_KEYS and n != "max_exp_avg_sq"}
                if k in sd["state"]:
                    new_state[k] = s
                index += 1
        new_state.update({k: v for k, v in sd["state"].items() if k not in new_state})  # torch keeps strays as-is
        self._check_values()
        return {**sd, "state": new_state}

    def _convert(self, s: dict[str, Any], param: torch.Tensor, group: dict[str, Any], index: int, gi: int) -> dict:
        missing = [key for key in REQUIRED_KEYS if key not in s]
        if missing:
            raise OptimizerStateError(
                f"CompensatedAdamW.load_state_dict: the state of parameter {index} (param group {gi}) has keys "
                f"{sorted(s)} but lacks {missing}: it was saved by {self.source}, not an AdamW; {_fix()}"
            )
        dtypes = self.opt._state_dtypes_for(param, group)
        where = f"parameter {index} (param group {gi})"
        out: dict[str, torch.Tensor] = {}
        step = s["step"]
        out["step"] = torch.as_tensor(step, dtype=torch.float32).to(device="cpu", copy=True).reshape(())
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = self._tensor(s[key], param, dtypes[key], f"state[{key!r}] of {where}")
            if out[key].dtype.itemsize < s[key].dtype.itemsize:
                narrowing = (key, s[key].dtype, out[key].dtype)
                self.moments_narrowed[narrowing] = self.moments_narrowed.get(narrowing, 0) + 1
        comp = s.get("compensation")
        if "compensation" in dtypes:
            if comp is None:
                self.narrowed_dtype = dtypes["compensation"]
                value = self.full_precision.get(id(param))
                if value is None:
                    out["compensation"] = torch.zeros_like(param, dtype=dtypes["compensation"])
                    self.narrowed.append(index)
                else:
                    out["compensation"] = residual(param, value, dtypes["compensation"], index, "load_state_dict")
                    self.seeded.append(index)
            else:
                out["compensation"] = self._tensor(comp, param, dtypes["compensation"], f"compensation of {where}")
        elif comp is not None:
            self.fold.append((index, param, self._tensor(comp, param, comp.dtype, f"compensation of {where}")))
        return out

    @staticmethod
    def _tensor(value: Any, param: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise OptimizerStateError(f"CompensatedAdamW.load_state_dict: {what} is {value!r}, not a float tensor")
        if tuple(value.shape) != tuple(param.shape):
            raise OptimizerStateError(
                f"CompensatedAdamW.load_state_dict: {what} has shape {tuple(value.shape)}, but the parameter has "
                f"shape {tuple(param.shape)}; the state belongs to another model or parameter order"
            )
        return value.to(device=param.device, dtype=dtype, copy=True)

    def _check_values(self) -> None:
        """One host read per state dict (load time only): nan/inf anywhere, a negative ``exp_avg_sq`` or step."""
        checks: list[tuple[str, torch.Tensor]] = []
        for _, index, gi, tensors in self.converted.values():
            for key, t in tensors.items():
                t = local_tensor(t)
                bad = ~torch.isfinite(t).all()
                if key in ("exp_avg_sq", "step"):
                    bad = bad | (t < 0).any()
                checks.append((f"state[{key!r}] of parameter {index} (param group {gi})", bad))
        for index, _, comp in self.fold:
            checks.append((f"compensation of parameter {index}", ~torch.isfinite(local_tensor(comp)).all()))
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, flag) in enumerate(checks):
            by_device.setdefault(flag.device, []).append(i)
        flags = [False] * len(checks)
        for positions in by_device.values():  # one read per device
            for i, flag in zip(positions, torch.stack([checks[i][1] for i in positions]).tolist()):
                flags[i] = flag
        bad = [what for (what, _), flag in zip(checks, flags) if flag]
        if bad:
            raise OptimizerStateError(
                f"CompensatedAdamW.load_state_dict: corrupt optimizer state: {', '.join(bad)} holds nan/inf values "
                "(or negative values where only >= 0 is valid: exp_avg_sq, step). The checkpoint was saved after the "
                "state diverged or was damaged: resume from an earlier checkpoint, or load only the model weights"
            )

    def post_hook(self, optimizer: Any) -> None:
        for param, _, _, tensors in self.converted.values():
            self.opt.state[param].update(tensors)
        fold_into_parameters(self.fold, "CompensatedAdamW")
        for gi, kept in self.layout_kept.items():
            info_rank_zero(
                f"CompensatedAdamW: param group {gi} keeps the state layout it was saved with ({', '.join(kept)}), not "
                "the one this optimizer was built with: loaded param groups replace the constructor's, as in every "
                "torch optimizer."
            )
        for (key, saved, kept), count in self.moments_narrowed.items():
            info_rank_zero(
                f"CompensatedAdamW: the {key} of {count} parameter(s) saved by {self.source} in {dtype_name(saved)} "
                f"was rounded once, to nearest, to {dtype_name(kept)}: the dtype this optimizer keeps it in "
                f"({key}_dtype)."
            )
        if self.seeded:
            dtype = dtype_name(self.narrowed_dtype)
            info_rank_zero(
                f"CompensatedAdamW: the state of {len(self.seeded)} {dtype} parameter(s) (first: parameter "
                f"{self.seeded[0]}) was saved by {self.source} without a compensation; it was created from the "
                f"full-precision weights (their residual w - {dtype}(w), rounded to {dtype}): p + compensation keeps "
                f"about {compensated_bits(self.narrowed_dtype)} of fp32's 24 mantissa bits, the rest was rounded away."
            )
        if self.narrowed:
            dtype = self.narrowed_dtype
            info_rank_zero(
                f"CompensatedAdamW: the state of {len(self.narrowed)} {dtype} parameter(s) (first: parameter "
                f"{self.narrowed[0]}) was saved by {self.source} without a compensation; it starts at zero. If the "
                f"saved run kept these weights in higher precision, their bits beyond {dtype} were lost when the "
                "parameters were narrowed. To keep them, pass the full-precision weights to "
                "optimizer.seed_compensation_from(...) after loading."
            )


def fold_into_parameters(items: list[tuple[int, torch.Tensor, torch.Tensor]], who: str) -> None:
    """Add each saved compensation into its now higher-precision parameter (``p + c``), and log what was done.

    A parameter is folded only if every element is representable in the compensation's dtype, i.e. it still holds
    the rounded half-precision weight the compensation belongs to; otherwise its compensation is dropped and that is
    logged.

    Args:
        items: ``(index, parameter, compensation)`` with the index used in messages.
        who: The optimizer that loads the state, for messages.
    """
    folded, exact, dropped = [], True, []
    with torch.no_grad():
        for index, param, comp in items:
            p, c = local_tensor(param), local_tensor(comp)
            if not torch.equal(p.to(c.dtype).to(p.dtype), p):
                dropped.append(index)
                continue
            before = p.clone()
            p.add_(c.to(p.dtype))
            exact = exact and torch.equal((p - before).to(c.dtype), c)
            folded.append(index)
    if folded:
        how = "exactly" if exact else "to the nearest representable value"
        info_rank_zero(
            f"{who}: folded the saved compensation of {len(folded)} parameter(s) (first: parameter {folded[0]}) into "
            f"the now higher-precision parameters: each is p + compensation, {how}, the weight the half-precision "
            "run was training. The compensation was dropped."
        )
    if dropped:
        info_rank_zero(
            f"{who}: dropped the saved compensation of {len(dropped)} parameter(s) (first: parameter {dropped[0]}) "
            "without folding it: the parameter holds values with bits beyond the compensation's dtype, so it is not "
            "the rounded weight the compensation belongs to (the weights were saved at full precision, or are loaded "
            "after the optimizer state; in the second case up to half a half-precision ulp per element is lost)."
        )


def residual(param: torch.Tensor, value: torch.Tensor, dtype: torch.dtype, index: int, where: str) -> torch.Tensor:
    """The compensation of a half-precision ``param`` rounded from the full-precision ``value``: ``value - param``
    rounded to ``dtype``, laid out like ``param`` (a DTensor value is used shard by shard).

    Raises:
        OptimizerStateError: If the shapes differ, or ``param`` does not hold ``value`` rounded to its dtype.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(value.shape) != tuple(param.shape):
        raise OptimizerStateError(
            f"{where}: the full-precision value for parameter {index} has shape {tuple(value.shape)}, the parameter "
            f"{tuple(param.shape)}"
        )
    if isinstance(param, DTensor) and not isinstance(value, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    p = local_tensor(param)
    wide = local_tensor(value).to(p.device)
    wide = wide.to(torch.float64 if wide.dtype == torch.float64 else torch.float32)
    if not torch.equal(wide.to(p.dtype), p):
        raise OptimizerStateError(
            f"{where}: parameter {index} ({p.dtype}) does not hold the given weights rounded to {p.dtype}; load those "
            "weights into the model first (the compensation is their residual)"
        )
    with torch.no_grad():
        out = torch.zeros_like(param, dtype=dtype)
        local_tensor(out).copy_(wide - p.to(wide.dtype))  # rounded once, to the compensation's dtype
    return out


def seed_compensation(optimizer: Any, full_precision_params: Any) -> int:
    """Implementation of :meth:`CompensatedAdamW.seed_compensation_from`; returns the number of parameters seeded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if hasattr(full_precision_params, "items"):
        by_id = {id(p): v for p, v in full_precision_params.items()}
        pairs = [(i, p, by_id.get(id(p))) for i, p in enumerate(params)]
        unknown = len(by_id) - sum(v is not None for _, _, v in pairs)
        if unknown:
            raise OptimizerStateError(f"seed_compensation_from: {unknown} key(s) are not parameters of this optimizer")
    else:
        values = list(full_precision_params)
        if len(values) != len(params):
            raise OptimizerStateError(
                f"seed_compensation_from: got {len(values)} tensors for {len(params)} parameters; pass one per "
                "parameter in optimizer order (None to skip one), or a dict {parameter: full-precision tensor}"
            )
        pairs = list(zip(range(len(params)), params, values))
    groups_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    seeded = []
    with torch.no_grad():
        for index, param, value in pairs:
            if value is None or param.dtype not in HALF_DTYPES:
                continue
            comp = residual(param, value, param.dtype, index, "seed_compensation_from")
            state = optimizer._init_state(param, groups_of[id(param)])
            local_tensor(state["compensation"]).copy_(local_tensor(comp))
            seeded.append(index)
    if seeded:
        dtype = params[seeded[0]].dtype
        info_rank_zero(
            f"CompensatedAdamW: seeded the compensation of {len(seeded)} {dtype} parameter(s) from full-precision "
            f"weights: p + compensation keeps about {compensated_bits(dtype)} of fp32's 24 mantissa bits."
        )
    return len(seeded)


def state_matches(state: dict[str, Any], dtypes: dict[str, torch.dtype]) -> bool:
    """Whether a live state holds every tensor of ``dtypes`` in its dtype, and a compensation only if one is wanted
    (else :func:`adapt_state` converts it)."""
    if ("compensation" in state) != ("compensation" in dtypes):
        return False
    for key, dtype in dtypes.items():  # a loop, not all() over a generator: asked per tensor at every step
        value = state.get(key)
        if value is None or value.dtype != dtype:
            return False
    return True


def adapt_state(state: dict[str, Any], param: torch.Tensor, dtypes: dict[str, torch.dtype]) -> None:
    """Convert a live state whose parameter changed dtype since (``module.to(torch.bfloat16)`` keeps the Parameter
    objects), as :meth:`StateLoader` converts a loaded one: moments cast to ``dtypes``, a compensation created
    (narrowing, zero: logged) or folded into the parameter (widening, when it holds the rounded weight)."""
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].dtype != dtypes[key]:
            state[key] = state[key].to(dtypes[key])
    if "compensation" in dtypes and "compensation" not in state:
        state["compensation"] = torch.zeros_like(param, dtype=dtypes["compensation"])
        info_rank_zero(
            f"CompensatedAdamW: a parameter of shape {tuple(param.shape)} is now {param.dtype} and had no "
            "compensation; it starts at zero: bits beyond that dtype, if the weight had them, were lost when it was "
            "narrowed. optimizer.seed_compensation_from(...) restores them from the full-precision weights."
        )
    elif "compensation" not in dtypes and "compensation" in state:
        fold_into_parameters([(0, param, state.pop("compensation"))], "CompensatedAdamW")
