"""AdamW for bf16/fp16 parameters with Kahan-compensated parameter writes.

torch.optim.AdamW on half-precision parameters keeps its moments in the
parameter dtype and writes the update straight into the parameter: updates
smaller than half an ulp round away, and a bf16 ``exp_avg_sq`` with
``beta2=0.999`` cannot decay (a 0.1% change is below half a bf16 ulp).
:class:`CompensatedAdamW` fixes both: every parameter write keeps the lost low
bits in a ``compensation`` buffer of the parameter dtype (Kahan summation), and
the moments are stored in configurable dtypes (by default both bf16, the
second rounded stochastically). For fp32/fp64 parameters it is plain AdamW.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_precision.optim import (
    _buckets,
    _chunk_plan,
    _compensated_state,
    _compensated_step,
    _compiled_step,
    _nonfinite,
)
from lightning_precision.optim._compensated_options import (
    _STATE_DTYPES,
    _normalise_group_options,
    _state_dtype_name,
    check_new_group,
    check_options,
    settle_roundings,
)
from lightning_precision.optim._reference_step import (
    advance_steps,
    state_rounding,
    step_reference_bucket,
    step_scalars,
)
from lightning_precision.values import expect_type

__all__ = ["CompensatedAdamW"]

_HALF_DTYPES = _compensated_state.HALF_DTYPES
# Group keys of torch.optim.AdamW that mean nothing here; dropped from a converted state dict's groups.
_TORCH_ADAMW_KEYS = ("amsgrad", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


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
    local shard in place, elementwise, with no host read of a device tensor.

    Memory per element of a bf16 parameter with the defaults, steady state:
    2 (param) + 2 (gradient) + 2 (compensation) + 2 (bf16 exp_avg) + 2 (bf16
    exp_avg_sq) = 10 bytes (12 with an fp32 ``exp_avg_sq``), vs. 16 for bf16
    params with an fp32 master copy and fp32 moments. The eager step (``implementation="chunked"``)
    works through bounded chunks of elements, so its fp32 temporaries are those
    of one chunk: with the automatic ``chunk_size`` they measured 0.05-0.76
    B/param of the model (1M-64M parameters), against 20 (16 with an fp32
    ``exp_avg_sq``) for the whole-tensor ``implementation="reference"`` step,
    which computes bitwise the same result on CPU. ``p + c`` carries about 16 mantissa bits, and ``c`` is re-rounded at
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
            parameters. Default: ``torch.bfloat16``, rounded stochastically:
            within the seed spread of an fp32 one on the LM benchmark, for 10
            instead of 12 B/param (docs/precision-guide.md); ``torch.float32``
            for the 12 B/param layout, which steps faster.
        exp_avg_rounding: How the fp32 first moment is written into a
            bfloat16 ``exp_avg``: ``"nearest"`` (default), ``"stochastic"``
            (up or down with probability given by the distance to each
            neighbour, so every write is unbiased), or ``"auto"``.
        exp_avg_sq_rounding: The same for the second moment. Default:
            ``"auto"``: stochastic for a bf16 moment (rounded to nearest, a
            bf16 second moment cannot decay at ``beta2=0.999``), nearest for
            any other. A resumed run keeps the layout it was saved with.
        rounding_seed: Seed of the stochastic rounding. The random bits are a
            hash of the seed, the step, the parameter's index in this optimizer
            and the element's index in the full (unsharded) tensor, so they do
            not depend on rank count, sharding or chunking, and a resumed run
            draws the same bits as an uninterrupted one. Default: 0.
        implementation: ``"auto"`` (default): ``"compiled"`` for optimizers
            stepping at least 2**20 elements where torch.compile works, else
            ``"chunked"``. ``"compiled"``: one fused kernel per tensor (small
            tensors packed), bitwise the chunked step's result; where it cannot
            compile, a warning and the chunked step. ``"chunked"``: eager ops
            over chunks of at most ``chunk_size`` elements (bounded temporary
            memory). ``"reference"``: the same ops over whole tensors, holding
            fp32 copies of a group's tensors at once; kept to check against.
        chunk_size: Elements per chunk of the chunked step. Default: None, which
            sizes a chunk so that its temporaries take 0.375 bytes per stepped
            parameter, at least 4096 and at most 2**17 elements on CPU (a chunk
            stays near the caches) or 2**22 on accelerators.

    Non-finite gradients: a tensor whose gradient holds nan or inf is not
    updated at that step (parameter, moments and compensation unchanged; the
    step count advances) and the first such step is reported once with a
    :class:`~lightning_precision.errors.PrecisionWarning` naming the step. The
    check has no host read on accelerators: per-tensor flags from one
    ``torch._foreach_norm(grads, inf)`` mask the writes with ``torch.where``.
    GradScaler's ``grad_scale``/``found_inf`` are honoured when set; set
    ``optimizer._step_supports_amp_scaling = True`` to have ``GradScaler.step``
    pass them (no host read for the inf check). It is off by default because
    Lightning refuses gradient clipping for such optimizers.

    Raises:
        PrecisionConfigError: (a ValueError) naming the value and the valid
            choices, for the constructor and for every parameter group: ``lr``
            or ``weight_decay`` not a finite number >= 0, ``eps`` not a finite
            number > 0, a beta outside [0, 1), ``maximize`` not a bool, a state
            dtype, rounding, ``rounding_seed``, ``implementation`` or
            ``chunk_size`` not one of the valid choices, or stochastic rounding
            asked of a moment not stored in bfloat16.
    """

    keeps_master_weights: bool = False
    compensated_update: bool = True
    check_options = staticmethod(check_options)  # a config's init args, checked by the catalogue before building

    @staticmethod
    def step_temporaries(settings: dict[str, Any]) -> tuple[float, float]:
        """What one step allocates on top of the steady state, per parameter, for the optimizer catalogue:
        ``(copies of the parameters, extra bytes)`` (:func:`~lightning_precision.optim._chunk_plan.step_temporaries`)."""
        return _chunk_plan.step_temporaries(check_options(settings))

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
        exp_avg_sq_dtype: torch.dtype | str = torch.bfloat16,
        exp_avg_rounding: str = "nearest",
        exp_avg_sq_rounding: str = "auto",
        rounding_seed: int = 0,
        implementation: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        expect_type(params, Iterable, what="CompensatedAdamW(params=...)", expected="an iterable of tensors or dicts")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, exp_avg_dtype=exp_avg_dtype,
            exp_avg_sq_dtype=exp_avg_sq_dtype, exp_avg_rounding=exp_avg_rounding,
            exp_avg_sq_rounding=exp_avg_sq_rounding, rounding_seed=rounding_seed, implementation=implementation,
            chunk_size=chunk_size,
        )  # fmt: skip
        _normalise_group_options(defaults)
        self._nonfinite = _nonfinite.Reporter()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its options are checked with the constructor's rules.

        Args:
            param_group: Dict with ``params`` and optional per-group options.

        Raises:
            TypeError: If ``param_group`` is not a dict, or its ``params`` not a tensor or an iterable of tensors.
            PrecisionConfigError: If a per-group option is not one of the valid choices (the message names the
                group, e.g. ``lr (param group 1)``).
        """
        check_new_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        settle_roundings(self.param_groups[-1])

    def group_after_load(self, saved: dict[str, Any], index: int) -> dict[str, Any]:
        """The options a saved param group will have once loaded: checked, missing ones from this optimizer."""
        group = {k: v for k, v in saved.items() if k not in ("params", *_TORCH_ADAMW_KEYS)}
        for key, value in getattr(self, "defaults", {}).items():
            group.setdefault(key, value)
        _normalise_group_options(group, f" (loaded param group {index})")
        settle_roundings(group)
        return group

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also runs in load_state_dict: groups saved before an option existed, or by torch.optim.AdamW, get this
        # optimizer's values for the missing options; every group is checked as in the constructor.
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite", _nonfinite.Reporter())
        for i, group in enumerate(self.param_groups):
            checked = self.group_after_load(group, i)
            params = group["params"]
            group.clear()
            group.update(checked, params=params)

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
        dtypes = self._state_dtypes_for(param, group)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key, dtype in dtypes.items():
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        elif not _compensated_state.state_matches(state, dtypes):
            _compensated_state.adapt_state(state, param, dtypes)  # the parameter changed dtype since
        return state

    def _buckets(self) -> tuple[list, int]:
        """The tensors to step, by group and bucket, and the number of elements the chunked step takes."""
        return _buckets.collect(self)

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
        if torch.compiler.is_compiling():
            # Traced into a user's compiled region, the step would lose its compensation: inductor folds the bf16
            # rounding of each write unless emulate_precision_casts is on, which only the optimizer's own compile sets.
            raise RuntimeError(
                "CompensatedAdamW.step must not be compiled by torch.compile (the Kahan compensation would be folded "
                "away); it compiles its own step (implementation='auto' or 'compiled'). Call it outside the compiled "
                "function."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._nonfinite.poll()
        # Set by torch.amp.GradScaler.step for optimizers with _step_supports_amp_scaling.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        work, stepped_numel = self._buckets()
        for group, (device, _, _, _, half, chunked), bucket in work:
            indices, owners = bucket.pop(), bucket.pop()
            if grad_scale is not None:
                _nonfinite.unscale_(bucket[1], grad_scale)
            finite = _nonfinite.finite_flags(bucket[1], found_inf)
            if device.type == "cpu":
                # A CPU flag is read for free: skipped tensors leave the step untouched, their steps still advance.
                keep = finite.tolist()
                if not all(keep):
                    self._nonfinite.record(finite, [s + 1 for s in bucket[4]], indices, found_inf is not None)
                    torch._foreach_add_([s for s, k in zip(bucket[4], keep) if not k], 1.0)
                    bucket = [[t for t, k in zip(lst, keep) if k] for lst in bucket]
                    owners = [t for t, k in zip(owners, keep) if k]
                    if not owners:
                        continue
                finite = None
            if chunked:
                self._step_chunked(group, device, half, bucket, owners, stepped_numel, finite)
            else:
                step_reference_bucket(self.param_groups, group, device, half, bucket, owners, finite)
            if finite is not None:
                self._nonfinite.record(finite, bucket[4], indices, found_inf is not None)
        return loss

    def _step_chunked(self, group, device, half, bucket, owners, stepped_numel, finite) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps, comps = bucket
        counts = advance_steps(steps)
        neg_step_size, bc2_sqrt = step_scalars(group, counts, device, unbind=False)
        rounding = self._state_rounding(group, owners, counts) if half else None
        compiled = half and _compiled_step.wanted(group["implementation"], device, stepped_numel, rounding)
        if device.type == "cpu" and not compiled:
            # Python floats take torch's scalar fast path, with the same fp32 result as the 0-dim tensors. On
            # other devices the device tensors stay: a host scalar divisor becomes a reciprocal multiply there.
            neg_step_size, bc2_sqrt = neg_step_size.tolist(), bc2_sqrt.tolist()
        elif not compiled:
            neg_step_size, bc2_sqrt = neg_step_size.unbind(), bc2_sqrt.unbind()
        chunk_size = group["chunk_size"]
        if chunk_size is None:
            temp_bytes = _chunk_plan.temp_bytes_per_element(
                params[0].dtype,
                exp_avgs[0].dtype,
                exp_avg_sqs[0].dtype,
                compensated=half,
                stochastic=rounding is not None and any(rounding),
                masked=finite is not None,
            )
            chunk_size = _chunk_plan.auto_chunk_size(stepped_numel, device, temp_bytes)
        beta1, beta2 = group["betas"]
        options = _compensated_step.StepOptions(
            group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["maximize"], chunk_size
        )
        scalars = (neg_step_size, bc2_sqrt)
        tensors = _compensated_step.Bucket(params, grads, exp_avgs, exp_avg_sqs, comps)
        if compiled:
            packs = options
            if group["chunk_size"] is None and finite is None:
                # A compiled call's temporaries are its pack's buffers only: larger packs, fewer calls, same budget.
                pack_size = _chunk_plan.auto_chunk_size(stepped_numel, device, _compiled_step.PACK_BYTES_PER_ELEMENT)
                packs = dataclasses.replace(options, chunk_size=pack_size)
            if _compiled_step.run(tensors, scalars, packs, rounding, finite, counts):
                return
        if half:
            _compensated_step.compensated_step(tensors, scalars, options, rounding, finite)
        else:
            _compensated_step.plain_step(tensors, scalars, options, finite)

    def _state_rounding(self, group, owners, counts) -> _compensated_step.StateRounding:
        return state_rounding(self.param_groups, group, owners, counts)

    def seed_compensation_from(self, full_precision_params: Any) -> int:
        """Set the compensation of bf16/fp16 parameters from the full-precision weights they were rounded from.

        A strategy or script that loads an fp32 checkpoint into a bf16 model calls this after loading the weights
        (and, when resuming, after :meth:`load_state_dict`): each compensation becomes the residual
        ``w - bf16(w)`` rounded to the compensation's dtype, so ``p + c`` keeps about 16 of fp32's 24 mantissa
        bits (22 for fp16) instead of the 8 (11) of the parameter alone. A parameter without state gets a fresh
        one (step 0, zero moments).

        Args:
            full_precision_params: A dict ``{parameter: full-precision tensor}``, or one tensor (or None to skip)
                per parameter in optimizer order (all groups). Entries for fp32/fp64 parameters are ignored.

        Returns:
            The number of parameters seeded.

        Raises:
            OptimizerStateError: If a value's shape differs from its parameter's, a dict key is not a parameter of
                this optimizer, a list has the wrong length, or a parameter does not hold its value rounded to the
                parameter dtype (load the weights into the model first).
        """
        return _compensated_state.seed_compensation(self, full_precision_params)

    def load_state_dict(self, state_dict: dict[str, Any], *, full_precision_params: Any = None) -> None:
        """Load optimizer state: converted to this optimizer's dtypes, storage and format, and checked first.

        torch's default would cast an fp32 ``exp_avg_sq`` of a bf16 parameter to bf16 and share ``step`` with the
        dict; here moments and compensation are copied in the dtypes this optimizer chooses, ``step`` as a CPU fp32
        tensor, and user load hooks see the full dict. A state of other storage dtypes or of torch.optim.AdamW is
        converted: a bf16/fp16 parameter saved without compensation gets a zero one (logged;
        :meth:`seed_compensation_from` restores the bits), a saved compensation of a now fp32 parameter is folded
        into it if the parameter still holds the rounded weight (``optim/_compensated_state.py``). Nothing is
        installed unless all of it is valid.

        Args:
            state_dict: Optimizer state, as returned by :meth:`state_dict` (of this or torch.optim.AdamW).
            full_precision_params: ``{parameter: full-precision weight}``: a bf16/fp16 parameter saved without a
                compensation gets the residual as :meth:`seed_compensation_from` gives it, not zero.

        Raises:
            ValueError: If the state dict does not match the parameter groups.
            OptimizerStateError: If a state tensor is nan/inf, a second moment or step negative, a shape differs
                from the parameter's, the state lacks AdamW's keys or is an AMSGrad state, or a parameter does not
                hold its ``full_precision_params`` value rounded.
            PrecisionConfigError: If a saved group option is invalid.
        """
        loader = _compensated_state.StateLoader(self, full_precision_params)
        pre = self.register_load_state_dict_pre_hook(loader.pre_hook)
        post = self.register_load_state_dict_post_hook(loader.post_hook, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
