"""The bounded-memory step of :class:`~lightning_precision.optim.CompensatedAdamW`.

The reference step (``implementation="reference"``) runs each ``torch._foreach_*`` op over whole tensors, so it holds
fp32 copies of every gradient, moment, parameter and compensation of a bucket at once (16 B/param, measured, on top of
the 12 B/param steady state). The step here applies the same elementwise ops, in the same order and dtypes, to bounded
chunks of elements: each chunk is a piece of one large tensor, or several small tensors packed together, and each op
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

from lightning_precision.optim._stochastic_rounding import TEMP_BYTES_PER_ELEMENT as ROUNDING_TEMP_BYTES
from lightning_precision.optim._stochastic_rounding import RoundingStream, memory_order, round_into_

Piece = tuple[int, int, int]  # (tensor index, start, stop) of a slice of a flat tensor
F32 = torch.float32

# Auto chunk size: the chunk's fp32 temporaries (temp_bytes_per_element per chunk element) may take up to
# TRANSIENT_BUDGET bytes per parameter of the model. The floor keeps the per-op dispatch cost small on tiny models.
# On CPU the cap keeps a chunk's working set near the L2/L3 caches, so the ~20 ops of the update do not each stream
# from DRAM (2**17 was the fastest of 2**15..2**19 on the 2-core AMD EPYC of benchmarks/optimizer_step.py); on
# accelerators it bounds the transient memory while each kernel still has enough work to hide its launch.
TRANSIENT_BUDGET = 0.375
AUTO_CHUNK_MIN = 4096
AUTO_CHUNK_CAP_CPU = 2**17
AUTO_CHUNK_CAP_ACCELERATOR = 2**22


def temp_bytes_per_element(
    param_dtype: torch.dtype,
    exp_avg_dtype: torch.dtype,
    exp_avg_sq_dtype: torch.dtype,
    *,
    compensated: bool,
    stochastic: bool = False,
    masked: bool = False,
) -> int:
    """Bytes of temporaries per chunk element that :func:`compensated_step` or :func:`plain_step` allocate.

    Args:
        param_dtype: Parameter dtype.
        exp_avg_dtype: First-moment dtype.
        exp_avg_sq_dtype: Second-moment dtype.
        compensated: Whether the compensated step (half-precision parameters) runs.
        stochastic: Whether a moment is written with stochastic rounding.
        masked: Whether the chunk's parameter and state are saved to be restored where a gradient is not finite.

    Returns:
        Compensated: fp32 gradient (then parameter), compensation, and the denominator or (later) the decay
        term, plus an fp32 copy of each moment not stored in fp32, plus the update when the first moment is fp32
        (it cannot be divided in place), plus the integer temporaries of a stochastic write. Plain: negated
        gradient, denominator and update in the parameter dtype.
    """
    saved = 0
    if masked:
        saved = param_dtype.itemsize * (2 if compensated else 1) + exp_avg_dtype.itemsize + exp_avg_sq_dtype.itemsize
    if not compensated:
        return 3 * param_dtype.itemsize + saved
    fp32 = 4 * (3 + (exp_avg_dtype != F32) + (exp_avg_sq_dtype != F32) + (exp_avg_dtype == F32))
    return fp32 + (ROUNDING_TEMP_BYTES if stochastic else 0) + saved


def auto_chunk_size(total_numel: int, device: torch.device, temp_bytes: int) -> int:
    """Elements per chunk when the user did not choose a size.

    Args:
        total_numel: Elements of all parameters (local shards) the optimizer steps.
        device: Device of the tensors of the bucket being stepped.
        temp_bytes: Temporary bytes per chunk element (:func:`temp_bytes_per_element`).

    Returns:
        The size whose temporaries take ``TRANSIENT_BUDGET`` (0.375) bytes per parameter of the model, clamped to
        ``[4096, cap]``, with a cap of 2**17 elements on CPU and 2**22 elsewhere.
    """
    cap = AUTO_CHUNK_CAP_CPU if device.type == "cpu" else AUTO_CHUNK_CAP_ACCELERATOR
    return max(AUTO_CHUNK_MIN, min(cap, int(total_numel * TRANSIENT_BUDGET) // temp_bytes))


def plan_chunks(numels: Sequence[int], chunk_size: int) -> list[list[Piece]]:
    """Split flat tensors of the given sizes into chunks of at most ``chunk_size`` elements.

    Tensors are taken in order; a tensor larger than the room left in the current chunk is split across chunks, and
    small tensors share a chunk, so every chunk but the last holds exactly ``chunk_size`` elements.

    Args:
        numels: Number of elements of each flat tensor.
        chunk_size: Maximum elements per chunk (positive).

    Returns:
        The chunks, each a list of ``(tensor index, start, stop)`` slices.
    """
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    room = chunk_size
    for index, numel in enumerate(numels):
        start = 0
        while start < numel:
            stop = min(numel, start + room)
            current.append((index, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_size
    if current:
        chunks.append(current)
    return chunks


def _tensor_addcmul_(self: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float) -> torch.Tensor:
    return self.addcmul_(t1, t2, value=value)


# The update's ops, each as a torch._foreach_* call over the lists of slices of a chunk of several pieces, and as the
# same kernel on the single slice of a one-piece chunk (the common case for large tensors), where a foreach call on a
# one-element list costs about twice the dispatch of the tensor method on CPU.
_OPS = {
    "copy_": (torch._foreach_copy_, torch.Tensor.copy_),
    "neg": (torch._foreach_neg, torch.neg),
    "neg_": (torch._foreach_neg_, torch.Tensor.neg_),
    "lerp_": (torch._foreach_lerp_, torch.Tensor.lerp_),
    "mul_": (torch._foreach_mul_, torch.Tensor.mul_),
    "addcmul_": (torch._foreach_addcmul_, _tensor_addcmul_),
    "sqrt": (torch._foreach_sqrt, torch.sqrt),
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

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self.single = len(pieces) == 1
        self.ops = _TENSOR_OPS if self.single else _FOREACH_OPS

    def slices(self, tensors: Sequence[torch.Tensor]) -> Any:
        if self.single:
            i, start, stop = self.pieces[0]
            return tensors[i][start:stop]
        return [tensors[i][start:stop] for i, start, stop in self.pieces]

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
    params, grads, exp_avgs, exp_avg_sqs, comps = bucket
    lr, beta1, beta2, eps = options.lr, options.beta1, options.beta2, options.eps
    weight_decay, chunk_size = options.weight_decay, options.chunk_size
    neg_step_size, bc2_sqrt = scalars
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
    decay_factor = -lr * weight_decay
    for pieces in plan_chunks(numels, chunk_size):
        chunk = _Chunk(pieces)
        ops = chunk.ops
        guard = None if finite is None else _Guard(chunk, finite, (params, exp_avgs, exp_avg_sqs, comps))
        g32 = chunk.views(g_buf)
        ops.copy_(g32, chunk.slices(grads))
        if options.maximize:
            ops.neg_(g32)
        m_slices, m32 = chunk.fp32_work(exp_avgs, m_buf)
        v_slices, v32 = chunk.fp32_work(exp_avg_sqs, v_buf)
        ops.lerp_(m32, g32, 1.0 - beta1)
        ops.mul_(v32, beta2)
        ops.addcmul_(v32, g32, g32, 1.0 - beta2)
        if m_buf is not None:
            _write_state(chunk, m_slices, m32, rounding.exp_avg, scratch)
        if v_buf is not None:
            _write_state(chunk, v_slices, v32, rounding.exp_avg_sq, scratch)

        denom = ops.sqrt(v32)
        ops.div_(denom, chunk.scalars(bc2_sqrt))
        ops.add_(denom, eps)
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
        if weight_decay != 0:
            decay = ops.add(p32, c32)  # decay the compensated value p + c
            ops.mul_(decay, decay_factor)
            ops.add_(update, decay)
            del decay
        ops.add_(update, c32)  # y = c + update
        ops.add_(p32, update)  # t = p + y
        del update
        ops.copy_(p_slices, p32)  # round to nearest
        ops.sub_(p32, p_slices)  # low bits lost by the write
        ops.copy_(c_slices, p32)
        if guard is not None:
            guard.restore()


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
        denom = ops.sqrt(v)
        ops.div_(denom, chunk.scalars(bc2_sqrt))
        ops.add_(denom, eps)
        update = ops.div(m, denom)
        del denom
        ops.mul_(update, chunk.scalars(neg_step_size))
        ops.add_(p, update)
        if guard is not None:
            guard.restore()


def flat_local_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D views of the local data of tensors that line up element by element, or None if they do not.

    DTensors (FSDP2 shards) are replaced by their local tensors when all of them share one mesh and placements, so
    the step reads and writes the shard in place and never redistributes. Tensors of the same shape and strides that
    are contiguous up to a permutation of their dimensions (e.g. channels-last) are viewed in memory order.

    Args:
        tensors: A parameter, its gradient and its state tensors.

    Returns:
        One flat view per tensor, aliasing its storage, or None when the tensors mix DTensor and plain tensors,
        differ in mesh, placements, shape or strides, or have gaps or overlaps in memory (the caller then uses the
        reference step for them).
    """
    from torch.distributed.tensor import DTensor

    first = tensors[0]
    if isinstance(first, DTensor):
        if not all(
            isinstance(t, DTensor) and t.device_mesh == first.device_mesh and t.placements == first.placements
            for t in tensors
        ):
            return None
        tensors = [t.to_local() for t in tensors]
    elif any(isinstance(t, DTensor) for t in tensors):
        return None
    shape, strides = tensors[0].shape, tensors[0].stride()
    if any(t.shape != shape or t.stride() != strides for t in tensors):
        return None
    order = memory_order(shape, strides)
    permuted = [t.permute(order) for t in tensors]
    if not all(t.is_contiguous() for t in permuted):
        return None
    return [t.reshape(-1) for t in permuted]
