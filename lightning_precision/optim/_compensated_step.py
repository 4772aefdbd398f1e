"""The bounded-memory step of :class:`~lightning_precision.optim.CompensatedAdamW`.

The reference step (``implementation="reference"``) runs each ``torch._foreach_*`` op over whole tensors, so it holds
fp32 copies of every gradient, moment, parameter and compensation of a bucket at once (20 B/param, measured, on top of
the 10 B/param steady state of the default layout). The step here applies the same elementwise ops, in the same order
and dtypes, to bounded chunks of elements: each chunk is a piece of one large tensor, or several small tensors packed together, and each op
is one tensor method call on the piece, or one ``torch._foreach_*`` call over the list of pieces. The fp32 temporaries
are then those of one chunk only, and on CPU a chunk of the default size stays near the caches between the ~20 ops of
the update.

Because every op is elementwise and sees the same operand values as in the reference, the result is bitwise the same
on CPU (tested in ``tests/optim/test_compensated_step.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from lightning_precision.optim._chunk_plan import Piece, plan_chunks
from lightning_precision.optim._stochastic_rounding import RoundingStream, round_into_

F32 = torch.float32


def _tensor_addcmul_(self: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float) -> torch.Tensor:
    return self.addcmul_(t1, t2, value=value)


def _rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch's CPU sqrt (MKL VML) is off by an ulp for about one fp32 value in six; the compiled step's sqrt is
    # correctly rounded. The sqrt of the fp64 value, rounded once to fp32, is the correctly rounded fp32 sqrt, so the
    # eager and the compiled step agree bitwise.
    return x.to(torch.float64).sqrt_().to(x.dtype)


def _foreach_rounded_sqrt(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_rounded_sqrt(x) for x in xs]


# The update's ops, each as a torch._foreach_* call over the lists of slices of a chunk of several pieces, and as the
# same kernel on the single slice of a one-piece chunk (the common case for large tensors), where a foreach call on a
# one-element list costs about twice the dispatch of the tensor method on CPU.
_OPS = {
    "copy_": (torch._foreach_copy_, torch.Tensor.copy_),
    "neg": (torch._foreach_neg, torch.neg),
    "sub": (torch._foreach_sub, torch.sub),
    "mul": (torch._foreach_mul, torch.mul),
    "neg_": (torch._foreach_neg_, torch.Tensor.neg_),
    "lerp_": (torch._foreach_lerp_, torch.Tensor.lerp_),
    "mul_": (torch._foreach_mul_, torch.Tensor.mul_),
    "addcmul_": (torch._foreach_addcmul_, _tensor_addcmul_),
    "sqrt": (_foreach_rounded_sqrt, _rounded_sqrt),
    "torch_sqrt": (torch._foreach_sqrt, torch.sqrt),  # the plain (fp32) step's, as in torch.optim.AdamW
    "div": (torch._foreach_div, torch.div),
    "div_": (torch._foreach_div_, torch.Tensor.div_),
    "add": (torch._foreach_add, torch.add),
    "add_": (torch._foreach_add_, torch.Tensor.add_),
    "sub_": (torch._foreach_sub_, torch.Tensor.sub_),
}
_FOREACH_OPS = SimpleNamespace(**{name: ops[0] for name, ops in _OPS.items()})
_TENSOR_OPS = SimpleNamespace(**{name: ops[1] for name, ops in _OPS.items()})


class _Chunk:
    """One chunk's slices, buffer views, per-tensor scalars and ops: lists for several pieces, bare for one."""

    def __init__(self, pieces: list[Piece], ops: SimpleNamespace | None = None) -> None:
        self.pieces = pieces
        self.single = len(pieces) == 1
        self.ops = ops or (_TENSOR_OPS if self.single else _FOREACH_OPS)

    def slices(self, tensors: Sequence[torch.Tensor]) -> Any:
        if self.single:
            i, start, stop = self.pieces[0]
            return tensors[i][start:stop]
        # A whole tensor is taken as it is: a slice would be one more view per tensor and step.
        return [
            t if stop - start == t.shape[0] else t[start:stop]
            for t, (_, start, stop) in zip((tensors[i] for i, _, _ in self.pieces), self.pieces)
        ]

    def views(self, buffer: torch.Tensor) -> Any:
        """Consecutive views of ``buffer`` shaped like the slices of the chunk."""
        if self.single:
            _, start, stop = self.pieces[0]
            return buffer[: stop - start]
        out, offset = [], 0
        for _, start, stop in self.pieces:
            out.append(buffer[offset : offset + stop - start])
            offset += stop - start
        return out

    def scalars(self, values: Sequence[torch.Tensor | float]) -> Any:
        if self.single:
            return values[self.pieces[0][0]]
        return [values[i] for i, _, _ in self.pieces]

    def fp32_work(self, state: Sequence[torch.Tensor], buffer: torch.Tensor | None) -> tuple[Any, Any]:
        """The chunk's slices of ``state`` and the fp32 tensors to update them in.

        An fp32 state is updated in place (as the reference's ``.to(float32)`` returns the tensor itself); any other
        dtype is copied into ``buffer`` and must be copied back.
        """
        slices = self.slices(state)
        if buffer is None:
            return slices, slices
        work = self.views(buffer)
        self.ops.copy_(work, slices)
        return slices, work


class _Guard:
    """Keeps a chunk's parameter and state as they were where the tensor's gradient is not finite (``finite[i]``
    False), with ``torch.where`` on the device flag: the step then needs no host read of the flag."""

    def __init__(self, chunk: _Chunk, finite: torch.Tensor, tensors: Sequence[Sequence[torch.Tensor]]) -> None:
        self.chunk, self.finite = chunk, finite
        self.slices = [chunk.slices(t) for t in tensors]
        self.saved = [[s.clone() for s in self._list(sl)] for sl in self.slices]

    def _list(self, slices: Any) -> list[torch.Tensor]:
        return [slices] if self.chunk.single else slices

    def restore(self) -> None:
        for slices, saved in zip(self.slices, self.saved):
            for (index, _, _), now, before in zip(self.chunk.pieces, self._list(slices), saved):
                now.copy_(torch.where(self.finite[index], now, before))


@dataclass(frozen=True)
class StepOptions:
    """The hyperparameters of one parameter group that the step functions read, and the chunk size."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    chunk_size: int


class Hyper(NamedTuple):
    """A group's constants as the update uses them: Python floats in the eager step, 0-dim fp32 tensors in the
    compiled one (so a new learning rate is a new input, not a recompile). Derived values are computed once, in
    double precision on the host, so both steps see the same fp32 constants."""

    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any
    eps: Any
    decay_factor: Any  # -lr * weight_decay, applied to p + c
    decays: bool
    maximize: bool

    @classmethod
    def of(cls, options: StepOptions) -> Hyper:
        return cls(
            1.0 - options.beta1, options.beta2, 1.0 - options.beta2, options.eps,
            -options.lr * options.weight_decay, options.weight_decay != 0, options.maximize,
        )  # fmt: skip


class StateRounding(NamedTuple):
    """Per-tensor random-bit streams of the moments written with stochastic rounding (``None``: to nearest)."""

    exp_avg: Sequence[RoundingStream] | None = None
    exp_avg_sq: Sequence[RoundingStream] | None = None


def _write_state(chunk: _Chunk, slices: Any, work: Any, streams: Sequence[RoundingStream] | None, scratch: Any) -> None:
    """Store a chunk's fp32 moment into its (non-fp32) slices: rounded to nearest, or stochastically by ``streams``."""
    if streams is None:
        chunk.ops.copy_(slices, work)
        return
    if chunk.single:
        slices, work = [slices], [work]
    for (index, start, _), dst, src in zip(chunk.pieces, slices, work):
        round_into_(dst, src, streams[index], start, scratch)


class Bucket(NamedTuple):
    """Tensors of one step call, index-aligned; all flat (1-D) and local (not DTensors)."""

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_sqs: Sequence[torch.Tensor]
    comps: Sequence[torch.Tensor | None]


def compensated_step(
    bucket: Bucket,
    scalars: tuple[Sequence[torch.Tensor | float], Sequence[torch.Tensor | float]],
    options: StepOptions,
    rounding: StateRounding | None = None,
    finite: torch.Tensor | None = None,
) -> None:
    """AdamW with a Kahan-compensated write into half-precision parameters, chunk by chunk.

    Args:
        bucket: Half-precision parameters, their gradients (any floating dtype), moments (any floating dtype) and
            compensation buffers (parameter dtype); all but the gradients are updated in place.
        scalars: ``-lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` per tensor: the reference step's 0-dim
            fp32 tensors, or their values as Python floats.
        options: The group's hyperparameters and the chunk size.
        rounding: Streams for the bf16 moments written with stochastic rounding; the others round to nearest.
        finite: Optional 1-D bool tensor on the device, one flag per tensor: where False, the tensor's parameter,
            moments and compensation are left as they were (no host read of the flags).
    """
    params, _, exp_avgs, exp_avg_sqs, comps = bucket
    chunk_size = options.chunk_size
    numels = [p.numel() for p in params]
    size = min(chunk_size, sum(numels))
    if size == 0:
        return
    device = params[0].device

    def buffer() -> torch.Tensor:
        return torch.empty(size, dtype=F32, device=device)

    # The gradient (later the parameter) and the compensation always need fp32 room; the moments only if not
    # already stored in fp32.
    g_buf, c_buf = buffer(), buffer()
    m_buf = None if all(m.dtype == F32 for m in exp_avgs) else buffer()
    v_buf = None if all(v.dtype == F32 for v in exp_avg_sqs) else buffer()
    rounding = rounding or StateRounding()
    stochastic = rounding.exp_avg is not None or rounding.exp_avg_sq is not None
    scratch = torch.empty(size, dtype=torch.int32, device=device) if stochastic else None
    hyper = Hyper.of(options)
    work = (g_buf, c_buf, m_buf, v_buf)
    for pieces in plan_chunks(numels, chunk_size):
        chunk = _Chunk(pieces)
        guard = None if finite is None else _Guard(chunk, finite, (params, exp_avgs, exp_avg_sqs, comps))
        compensated_chunk_(chunk, bucket, work, scalars, hyper, rounding, scratch)
        if guard is not None:
            guard.restore()


def update_moments_(ops: SimpleNamespace, m32: Any, v32: Any, g32: Any, hyper: Hyper) -> None:
    """``m += (1 - beta1) * (g - m)`` and ``v = beta2 * v + (1 - beta2) * g * g`` in fp32, in place.

    One rounding per op, in this order, for every path (tensor, foreach, compiled): torch's CPU ``lerp`` and
    ``addcmul`` fuse a multiply-add that inductor's CPU code does not, so with them the compiled step would drift
    from the eager one by an ulp of the moments, then of the parameters.
    """
    step = ops.sub(g32, m32)
    ops.mul_(step, hyper.one_minus_beta1)
    ops.add_(m32, step)
    del step
    square = ops.mul(g32, g32)
    ops.mul_(square, hyper.one_minus_beta2)
    ops.mul_(v32, hyper.beta2)
    ops.add_(v32, square)


def compensated_chunk_(
    chunk: _Chunk,
    bucket: Bucket,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    scalars: tuple[Sequence[Any], Sequence[Any]],
    hyper: Hyper,
    rounding: StateRounding,
    scratch: torch.Tensor | None,
) -> None:
    """The compensated AdamW update of one chunk, in place: the math of the eager and of the compiled step.

    Args:
        chunk: The chunk's pieces and the ops that run them (tensor methods, ``torch._foreach_*``, or the compiled
            step's).
        bucket: The flat tensors the pieces index.
        work: fp32 room of at least the chunk's size for the gradient (later the parameter) and the compensation,
            and for each moment not stored in fp32 (``None`` where it is: it is updated in place).
        scalars: Per-tensor ``-lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)``.
        hyper: The group's constants (:class:`Hyper`).
        rounding: Streams of the moments written with stochastic rounding.
        scratch: int32 room of the chunk's size for a stochastic write, or None when there is none.
    """
    ops = chunk.ops
    params, grads, exp_avgs, exp_avg_sqs, comps = bucket
    g_buf, c_buf, m_buf, v_buf = work
    neg_step_size, bc2_sqrt = scalars
    g32 = chunk.views(g_buf)
    ops.copy_(g32, chunk.slices(grads))
    if hyper.maximize:
        ops.neg_(g32)
    m_slices, m32 = chunk.fp32_work(exp_avgs, m_buf)
    v_slices, v32 = chunk.fp32_work(exp_avg_sqs, v_buf)
    update_moments_(ops, m32, v32, g32, hyper)
    if m_buf is not None:
        _write_state(chunk, m_slices, m32, rounding.exp_avg, scratch)
    if v_buf is not None:
        _write_state(chunk, v_slices, v32, rounding.exp_avg_sq, scratch)

    denom = ops.sqrt(v32)
    ops.div_(denom, chunk.scalars(bc2_sqrt))
    ops.add_(denom, hyper.eps)
    if m_buf is not None:
        ops.div_(m32, denom)  # the buffer's fp32 first moment is no longer needed
        update = m32
    else:
        update = ops.div(m32, denom)
    del denom
    ops.mul_(update, chunk.scalars(neg_step_size))

    p_slices, c_slices = chunk.slices(params), chunk.slices(comps)
    p32, c32 = g32, chunk.views(c_buf)  # the fp32 gradient is no longer needed
    ops.copy_(p32, p_slices)
    ops.copy_(c32, c_slices)
    if hyper.decays:
        decay = ops.add(p32, c32)  # decay the compensated value p + c
        ops.mul_(decay, hyper.decay_factor)
        ops.add_(update, decay)
        del decay
    ops.add_(update, c32)  # y = c + update
    ops.add_(p32, update)  # t = p + y
    del update
    ops.copy_(p_slices, p32)  # round to nearest
    ops.sub_(p32, p_slices)  # low bits lost by the write
    ops.copy_(c_slices, p32)


def plain_step(
    bucket: Bucket,
    scalars: tuple[Sequence[torch.Tensor | float], Sequence[torch.Tensor | float]],
    options: StepOptions,
    finite: torch.Tensor | None = None,
) -> None:
    """torch.optim.AdamW for fp32/fp64 parameters (state in the parameter dtype), chunk by chunk.

    Args:
        bucket: Parameters, their gradients and moments, all in the parameter dtype (``comps`` is not read).
        scalars: Per-tensor step scalars, as for :func:`compensated_step`.
        options: The group's hyperparameters and the chunk size.
        finite: Per-tensor finite-gradient flags, as for :func:`compensated_step`.
    """
    params, grads, exp_avgs, exp_avg_sqs, _ = bucket
    lr, beta1, beta2, eps, weight_decay = options.lr, options.beta1, options.beta2, options.eps, options.weight_decay
    neg_step_size, bc2_sqrt = scalars
    numels = [p.numel() for p in params]
    for pieces in plan_chunks(numels, options.chunk_size):
        chunk = _Chunk(pieces)
        ops = chunk.ops
        guard = None if finite is None else _Guard(chunk, finite, (params, exp_avgs, exp_avg_sqs))
        g = chunk.slices(grads)
        if options.maximize:
            g = ops.neg(g)
        p, m, v = chunk.slices(params), chunk.slices(exp_avgs), chunk.slices(exp_avg_sqs)
        if weight_decay != 0:
            ops.mul_(p, 1.0 - lr * weight_decay)
        ops.lerp_(m, g, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, g, g, 1.0 - beta2)
        denom = ops.torch_sqrt(v)
        ops.div_(denom, chunk.scalars(bc2_sqrt))
        ops.add_(denom, eps)
        update = ops.div(m, denom)
        del denom
        ops.mul_(update, chunk.scalars(neg_step_size))
        ops.add_(p, update)
        if guard is not None:
            guard.restore()
