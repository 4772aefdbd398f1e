"""AdamW for bf16/fp16 parameters with Kahan-compensated parameter writes.

torch.optim.AdamW on half-precision parameters keeps its moments in the
parameter dtype and writes the update straight into the parameter: updates
smaller than half an ulp round away, and a bf16 ``exp_avg_sq`` with
``beta2=0.999`` cannot decay (a 0.1% change is below half a bf16 ulp).
:class:`CompensatedAdamW` fixes both: every parameter write keeps the lost low
bits in a ``compensation`` buffer of the parameter dtype (Kahan summation), and
the moments are stored in configurable dtypes (``exp_avg_sq`` in fp32 by
default). For fp32/fp64 parameters it is plain AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_precision.optim import _compensated_step
from lightning_precision.optim._compensated_options import (
    _STATE_DTYPES,
    _normalise_group_options,
    _state_dtype_name,
    check_rounding_dtypes,
)
from lightning_precision.optim._stochastic_rounding import element_layout, round_into_, stream_for

__all__ = ["CompensatedAdamW"]

_HALF_DTYPES = (torch.bfloat16, torch.float16)
# State whose dtype/device is chosen by this optimizer, not by the parameter. torch's
# load_state_dict would cast these to the param dtype, and alias (not copy) "step".
_DTYPED_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "compensation")


class CompensatedAdamW(Optimizer):
    """AdamW that trains bf16/fp16 parameters to the fp32 result without fp32 master weights.

    Same update rule and hyperparameters as :class:`torch.optim.AdamW` (decoupled
    weight decay, bias correction). For a bf16/fp16 parameter ``p`` the optimizer
    keeps a ``compensation`` tensor ``c`` of the same dtype, so that ``p + c`` is
    the high-precision value of the weight; each step computes in fp32
    ``t = p + (c + update)``, writes ``p = round(t)`` and ``c = t - p``. Weight
    decay is applied to ``p + c``. The moments of half-precision parameters are
    stored in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``; all arithmetic is fp32.

    For fp32 and fp64 parameters no compensation is kept, the moments are in the
    parameter dtype and the result equals :class:`torch.optim.AdamW` up to fp32
    round-off.

    Per-parameter state: ``step`` (0-dim fp32 tensor on CPU), ``exp_avg``,
    ``exp_avg_sq`` and, for half-precision parameters only, ``compensation``.
    :meth:`load_state_dict` keeps these dtypes (torch's default would cast them
    to the parameter dtype). The dtype options are kept in ``param_groups`` as
    names (``"bfloat16"``), so the state dict holds no ``torch.dtype`` and saves
    with ``torch.distributed.checkpoint``.

    Works with DTensor parameters (FSDP2 shards): the step updates each rank's
    local shard in place, with elementwise ops only and no host read of a
    device tensor.

    Memory per element of a bf16 parameter with the defaults, steady state:
    2 (param) + 2 (gradient) + 2 (compensation) + 2 (bf16 exp_avg) + 4 (fp32
    exp_avg_sq) = 12 bytes, vs. 16 for bf16 params with an fp32 master copy and
    fp32 moments (2+2+4+4+4). The default step (``implementation="chunked"``)
    works through bounded chunks of elements, so its fp32 temporaries are those
    of one chunk: with the automatic ``chunk_size`` they stay under about
    0.4 B/param of the model, against 16 B/param (measured) for the whole-tensor
    ``implementation="reference"`` step, which computes bitwise the same result
    on CPU. ``p + c`` carries about 16 mantissa bits, and ``c`` is re-rounded at
    every write, so the effective weight tracks the fp32 trajectory closely but
    not exactly.

    Attributes:
        keeps_master_weights: False; the parameters themselves are the only copy
            of the weights.
        compensated_update: True; parameter writes are protected by Kahan
            compensation, so half-precision parameters are safe to train.

    Args:
        params: Iterable of parameters or parameter-group dicts.
        lr: Learning rate. Default: 1e-3.
        betas: Coefficients for the running averages of the gradient and its
            square. Default: (0.9, 0.999).
        eps: Term added to the denominator. Default: 1e-8.
        weight_decay: Decoupled weight decay coefficient. Default: 1e-2.
        maximize: Maximize the objective instead of minimizing. Default: False.
        exp_avg_dtype: Storage dtype of the first moment of bf16/fp16
            parameters (``torch.float32``, ``torch.bfloat16``, ``torch.float16``
            or their names such as ``"bf16"``). Default: ``torch.bfloat16``
            (within run-to-run noise of fp32 in benchmarks/compensated_adamw.py).
        exp_avg_sq_dtype: Storage dtype of the second moment of bf16/fp16
            parameters. Default: ``torch.float32`` (a bf16 second moment
            rounded to nearest cannot follow ``beta2=0.999``).
        exp_avg_rounding: How the fp32 first moment is written into a
            bfloat16 ``exp_avg``: ``"nearest"`` (default) or ``"stochastic"``
            (up or down with probability given by the distance to each
            neighbour, so every write is unbiased).
        exp_avg_sq_rounding: The same for the second moment. With
            ``exp_avg_sq_dtype=torch.bfloat16, exp_avg_sq_rounding="stochastic"``
            the second moment decays at ``beta2=0.999`` in expectation, for
            10 instead of 12 bytes per parameter; measured within run-to-run
            noise of the fp32 second moment, but the step takes about twice as
            long on CPU (it hashes every element), so it is not the default
            (docs/precision-guide.md).
        rounding_seed: Seed of the stochastic rounding. The random bits are a
            hash of the seed, the step, the parameter's index in this optimizer
            and the element's index in the full (unsharded) tensor, so they do
            not depend on rank count, sharding or chunking, and a resumed run
            draws the same bits as an uninterrupted one. Default: 0.
        implementation: ``"chunked"`` (default): the update runs over chunks of
            at most ``chunk_size`` elements, as ``torch._foreach_*`` ops over
            slices of the parameters, so temporary memory is bounded.
            ``"reference"``: the same ops over whole tensors, holding fp32 copies
            of all of a group's gradients, moments, parameters and compensations
            at once; kept to check the chunked step against.
        chunk_size: Elements per chunk of the chunked step. Default: None, which
            sizes a chunk so that its temporaries take 0.375 bytes per stepped
            parameter, at least 4096 and at most 2**17 elements on CPU (a chunk
            stays near the caches) or 2**22 on accelerators.

    Raises:
        ValueError: If a hyperparameter is out of range.
        PrecisionConfigError: If a state dtype, a rounding, ``rounding_seed``,
            ``implementation`` or ``chunk_size`` is not one of the valid
            choices, or stochastic rounding is asked of a moment not stored in
            bfloat16 (a ValueError).
    """

    keeps_master_weights: bool = False
    compensated_update: bool = True

    @staticmethod
    def step_temporaries(settings: dict[str, Any]) -> tuple[float, float]:
        """What one step allocates on top of the steady state, per parameter, for the optimizer catalogue:
        ``(copies of the parameters, extra bytes)``. The chunked step stays under its transient budget; the
        reference step holds fp32 copies of gradient, moments, parameter and compensation (16 B/param, measured
        by ``benchmarks/optimizer_step.py``)."""
        if settings.get("implementation", "chunked") == "reference":
            return (0.0, 16.0)
        return (0.0, _compensated_step.TRANSIENT_BUDGET)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        exp_avg_dtype: torch.dtype | str = torch.bfloat16,
        exp_avg_sq_dtype: torch.dtype | str = torch.float32,
        exp_avg_rounding: str = "nearest",
        exp_avg_sq_rounding: str = "nearest",
        rounding_seed: int = 0,
        implementation: str = "chunked",
        chunk_size: int | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor):
            raise TypeError(f"Invalid learning rate: {lr}; CompensatedAdamW takes a Python float")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas}; expected two values")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "exp_avg_dtype": exp_avg_dtype,
            "exp_avg_sq_dtype": exp_avg_sq_dtype,
            "exp_avg_rounding": exp_avg_rounding,
            "exp_avg_sq_rounding": exp_avg_sq_rounding,
            "rounding_seed": rounding_seed,
            "implementation": implementation,
            "chunk_size": chunk_size,
        }
        _normalise_group_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its per-group dtype, rounding, ``implementation`` and ``chunk_size`` options are
        validated.

        Args:
            param_group: Dict with ``params`` and optional per-group options.

        Raises:
            PrecisionConfigError: If a per-group option is not one of the valid choices.
        """
        _normalise_group_options(param_group)
        super().add_param_group(param_group)
        check_rounding_dtypes(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also runs in load_state_dict: state dicts saved before these options existed, or holding torch.dtype
        # values, get the defaults and the dtype names.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("implementation", "chunked")
            group.setdefault("chunk_size", None)
            group.setdefault("exp_avg_rounding", "nearest")
            group.setdefault("exp_avg_sq_rounding", "nearest")
            group.setdefault("rounding_seed", 0)
            _normalise_group_options(group)
            check_rounding_dtypes(group)

    @staticmethod
    def _state_dtypes_for(param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.dtype]:
        if param.dtype in _HALF_DTYPES:
            return {
                "exp_avg": _STATE_DTYPES[_state_dtype_name("exp_avg_dtype", group["exp_avg_dtype"])],
                "exp_avg_sq": _STATE_DTYPES[_state_dtype_name("exp_avg_sq_dtype", group["exp_avg_sq_dtype"])],
                "compensation": param.dtype,
            }
        return {"exp_avg": param.dtype, "exp_avg_sq": param.dtype}

    def state_dtypes(self, param: torch.Tensor) -> dict[str, torch.dtype]:
        """Storage dtypes of the tensor state this optimizer keeps for ``param``.

        Args:
            param: A parameter of this optimizer.

        Returns:
            Mapping from state key (``exp_avg``, ``exp_avg_sq`` and, for
            bf16/fp16 parameters, ``compensation``) to its dtype. ``step`` is
            always a 0-dim fp32 tensor and is not listed.

        Raises:
            ValueError: If ``param`` is not in any parameter group.
        """
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return self._state_dtypes_for(param, group)
        raise ValueError("param is not managed by this optimizer")

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        if torch.is_complex(param):
            raise RuntimeError("CompensatedAdamW does not support complex parameters")
        state = self.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key, dtype in self._state_dtypes_for(param, group).items():
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None.

        Raises:
            RuntimeError: On sparse gradients or complex parameters.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Tensors are bucketed by dtypes (each foreach call sees one dtype per list) and by whether the chunked step
        # can take them: it needs flat local views, which a DTensor with mismatched placements does not have.
        work = []
        stepped_numel = 0
        for group in self.param_groups:
            buckets: dict[tuple, list[list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CompensatedAdamW does not support sparse gradients")
                state = self._init_state(p, group)
                half = "compensation" in state
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
                if half:
                    tensors.append(state["compensation"])
                flat = None
                if group["implementation"] == "chunked":
                    flat = _compensated_step.flat_local_views(tensors)
                if flat is not None:
                    tensors = flat
                    stepped_numel += flat[0].numel()
                key = (p.device, p.dtype, state["exp_avg"].dtype, state["exp_avg_sq"].dtype, half, flat is not None)
                bucket = buckets.setdefault(key, [[], [], [], [], [], [], []])
                for lst, t in zip(bucket, tensors[:4]):
                    lst.append(t)
                bucket[4].append(state["step"])
                bucket[5].append(tensors[4] if half else None)
                bucket[6].append(p)
            work.extend((group, key, bucket) for key, bucket in buckets.items())

        for group, (device, _, _, _, half, chunked), bucket in work:
            owners = bucket.pop()
            if not chunked:
                if half:
                    self._step_compensated(group, *bucket, owners=owners)
                else:
                    self._step_plain(group, *bucket[:5])
                continue
            params, grads, exp_avgs, exp_avg_sqs, steps, comps = bucket
            neg_step_size, bc2_sqrt = self._step_scalars(group, steps, device)
            rounding = self._state_rounding(group, owners, steps) if half else None
            if device.type == "cpu":
                # Python floats take torch's scalar fast path, with the same fp32 result as the 0-dim tensors. On
                # other devices the device tensors stay: a host scalar divisor becomes a reciprocal multiply there.
                neg_step_size, bc2_sqrt = [t.item() for t in neg_step_size], [t.item() for t in bc2_sqrt]
            beta1, beta2 = group["betas"]
            chunk_size = group["chunk_size"]
            if chunk_size is None:
                temp_bytes = _compensated_step.temp_bytes_per_element(
                    params[0].dtype,
                    exp_avgs[0].dtype,
                    exp_avg_sqs[0].dtype,
                    compensated=half,
                    stochastic=rounding is not None and any(rounding),
                )
                chunk_size = _compensated_step.auto_chunk_size(stepped_numel, device, temp_bytes)
            options = _compensated_step.StepOptions(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                chunk_size=chunk_size,
            )
            scalars = (neg_step_size, bc2_sqrt)
            tensors = _compensated_step.Bucket(params, grads, exp_avgs, exp_avg_sqs, comps)
            if half:
                _compensated_step.compensated_step(tensors, scalars, options, rounding)
            else:
                _compensated_step.plain_step(tensors, scalars, options)
        return loss

    def _state_rounding(
        self, group: dict[str, Any], owners: list[torch.Tensor], steps: list[torch.Tensor]
    ) -> _compensated_step.StateRounding:
        """Random-bit streams for the group's moments set to stochastic rounding, after ``steps`` advanced.

        The parameter's index counts over all groups in order: the same on every rank and for every world size.
        """
        moments = [m for m in ("exp_avg", "exp_avg_sq") if group[f"{m}_rounding"] == "stochastic"]
        if not moments:
            return _compensated_step.StateRounding()
        index_of = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        layouts = [element_layout(p) for p in owners]
        streams = {
            m: [
                stream_for(layout, group["rounding_seed"], int(step.item()), index_of[id(p)], m)
                for p, layout, step in zip(owners, layouts, steps)
            ]
            for m in moments
        }
        return _compensated_step.StateRounding(**streams)

    @staticmethod
    def _step_scalars(group, steps, device):
        """Advance ``steps``; return per-tensor ``-lr / bc1`` and ``sqrt(bc2)`` as 0-dim fp32 tensors on ``device``.

        Tensor arithmetic instead of ``.item()`` keeps the step free of host reads.
        """
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1.0)
        t = torch.stack(steps).to(torch.float64)
        neg_step_size = (-group["lr"] / (1.0 - torch.pow(beta1, t))).to(torch.float32)
        bc2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt().to(torch.float32)
        if device.type != "cpu":
            both = torch.stack([neg_step_size, bc2_sqrt]).to(device, non_blocking=True)
            neg_step_size, bc2_sqrt = both[0], both[1]
        return neg_step_size.unbind(), bc2_sqrt.unbind()

    def _step_plain(self, group, params, grads, exp_avgs, exp_avg_sqs, steps):
        """torch.optim.AdamW for fp32/fp64 parameters (state in the parameter dtype)."""
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        neg_step_size, bc2_sqrt = self._step_scalars(group, steps, params[0].device)
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

    def _step_compensated(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, comps, *, owners):
        """AdamW in fp32 arithmetic with a Kahan-compensated write into half-precision params."""
        beta1, beta2 = group["betas"]
        f32 = torch.float32
        g32 = [g.to(f32) for g in grads]
        if group["maximize"]:
            torch._foreach_neg_(g32)
        neg_step_size, bc2_sqrt = self._step_scalars(group, steps, params[0].device)
        rounding = self._state_rounding(group, owners, steps)

        # .to(f32) returns the state tensor itself when it is already fp32, so it updates in place.
        m32 = [m.to(f32) for m in exp_avgs]
        v32 = [v.to(f32) for v in exp_avg_sqs]
        torch._foreach_lerp_(m32, g32, 1.0 - beta1)
        torch._foreach_mul_(v32, beta2)
        torch._foreach_addcmul_(v32, g32, g32, 1.0 - beta2)
        del g32
        # copy_ per tensor: DTensor has no sharding rule for _foreach_copy_.
        for stored, fp32, streams in ((exp_avgs, m32, rounding.exp_avg), (exp_avg_sqs, v32, rounding.exp_avg_sq)):
            for i, (dst, src) in enumerate(zip(stored, fp32)):
                if dst is src:
                    continue
                if streams is None:
                    dst.copy_(src)
                else:
                    _write_stochastically(dst, src, streams[i])

        denom = torch._foreach_sqrt(v32)
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, keeping the dtypes of ``exp_avg``, ``exp_avg_sq`` and ``compensation``.

        torch's default casts every floating state tensor to its parameter's
        dtype, which would round an fp32 ``exp_avg_sq`` of a bf16 parameter to
        bf16, and would share ``step`` with the loaded dict. Here the moments
        and compensation are copied to the parameter's device in the dtype this
        optimizer is configured for (for a round trip, the saved dtype), and
        ``step`` is copied as a CPU fp32 tensor; user load hooks still see the
        full state dict.

        Args:
            state_dict: Optimizer state, as returned by :meth:`state_dict`.

        Raises:
            ValueError: If the state dict does not match the parameter groups.
        """
        stash: dict[Any, dict[str, torch.Tensor]] = {}
        saved_groups: list[dict[str, Any]] = []

        def strip(optimizer, sd):
            # Runs after all user pre-hooks; hides dtype-sensitive tensors from torch's cast.
            saved_groups.extend(sd["param_groups"])
            new_state = {}
            for k, s in sd["state"].items():
                if isinstance(s, dict):
                    stash[k] = {n: v for n, v in s.items() if n in _DTYPED_STATE_KEYS}
                    s = {n: v for n, v in s.items() if n not in _DTYPED_STATE_KEYS}
                new_state[k] = s
            return {**sd, "state": new_state}

        def restore(optimizer):
            saved_ids = [i for g in saved_groups for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            id_map = dict(zip(saved_ids, params))
            groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
            for k, tensors in stash.items():
                if k not in id_map:
                    self.state[k].update(tensors)
                    continue
                param = id_map[k]
                dtypes = self._state_dtypes_for(param, groups_of[id(param)])
                for name, value in tensors.items():
                    if name == "step":
                        self.state[param][name] = value.to(device="cpu", dtype=torch.float32, copy=True)
                    else:
                        self.state[param][name] = value.to(device=param.device, dtype=dtypes[name], copy=True)

        pre = self.register_load_state_dict_pre_hook(strip)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()


def _write_stochastically(dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
    """The reference step's stochastic write of a whole (possibly DTensor) moment, through its local data."""
    flat = _compensated_step.flat_local_views([dst, src])
    if flat is None:
        raise RuntimeError(
            "CompensatedAdamW: stochastic rounding needs a moment whose local data lines up with its fp32 value; got "
            f"tensors of shapes {tuple(dst.shape)} and {tuple(src.shape)} with different layouts or placements"
        )
    local_dst, local_src = flat
    scratch = torch.empty(local_src.numel(), dtype=torch.int32, device=local_src.device)
    round_into_(local_dst, local_src, stream, 0, scratch)
