"""How the compiled step of :class:`~lightning_precision.optim.CompensatedAdamW` calls its kernel on small tensors.

A tensor of at least ``PACK_BELOW`` elements is one kernel call on its own flat view; smaller tensors that share a
step count are packed: gathered into flat buffers (one ``torch.cat`` per operand) of about ``chunk_size`` elements,
stepped in one call and copied back (one ``split_with_sizes_copy`` per written operand); with stochastically rounded
moments, tensors of one size are gathered as the rows of a ``[rows, size]`` pack instead, so each row draws its own
tensor's bits. 5,000 small tensors then cost a few hundred calls, not 5,000. The kernel (``_compiled_step._Kernel``)
is called as ``kernel(p, g, m, v, c, index, keys, base)``, ``index`` naming the tensor whose step scalars the call
uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_precision.optim import _compensated_step as eager
from lightning_precision.optim._stochastic_rounding import as_int32

# Tensors below this many elements are packed with others into one call; larger ones are a call each.
PACK_BELOW = 2**14
# Each call's kernel must see at least 2 elements: inductor specialises sizes 0 and 1, which would compile again.
MIN_CALL_NUMEL = 2


def guarded(bucket: eager.Bucket) -> tuple[Sequence[torch.Tensor], ...]:
    """The tensors a step writes (kept as they were where a gradient is not finite)."""
    return (bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.comps)


def stream_inputs(rounding: eager.StateRounding, index: int, device: torch.device) -> tuple[Any, Any]:
    """The kernel's key tensors (per moment) and base index for the streams of tensor ``index``."""
    if rounding.exp_avg is None and rounding.exp_avg_sq is None:
        return (None, None), None
    keys = tuple(
        None if streams is None else torch.tensor(as_int32(streams[index].key), dtype=torch.int32, device=device)
        for streams in rounding
    )
    layout = next(s for s in rounding if s is not None)[index].layout
    return keys, torch.tensor(as_int32(layout.base), dtype=torch.int32, device=device)


class _PackBuffers:
    """The flat buffers packs are gathered into, one per operand, allocated once and reused by every pack of a step.

    Buffers allocated per pack and freed after it cost the allocator fresh memory (and page faults) each time; reused,
    they also stay in cache between the gather, the kernel and the copy back. A step of 8M parameters in 5,000 tensors
    with an fp32 second moment, 1 thread: 91.6-98.9 -> 86.6-92.0 ms (``benchmarks/step_parts.py --layout 12``, runs
    alternating with the commit before); with the default layout within noise.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def gather(self, operand: int, tensors: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        """``torch.cat(tensors)`` of flat tensors of ``numel`` elements in all, written into operand ``operand``'s
        buffer."""
        buffer = self._buffers.get(operand)
        first = tensors[0]
        if buffer is None or buffer.numel() < numel or buffer.dtype != first.dtype:
            buffer = self._buffers[operand] = torch.empty(numel, dtype=first.dtype, device=first.device)
        return torch.cat(tensors, out=buffer[:numel])


def _copy_back(stored: list[list[torch.Tensor]], packed: list[torch.Tensor], sizes: list[int]) -> None:
    """Write a pack's updated operands (all but the gradient) back into the tensors of ``sizes`` elements they were
    gathered from."""
    for written, flat in zip(stored[:1] + stored[2:], packed[:1] + packed[2:]):
        torch.split_with_sizes_copy(flat.view(-1), sizes, out=written)


def step_packed(kernel, bucket, indices, scalars, rounding, finite, options) -> None:
    """Step small tensors that share a step count: whole tensors gathered into flat buffers of about ``chunk_size``
    elements, one kernel call each, and copied back."""
    if rounding.exp_avg is not None or rounding.exp_avg_sq is not None:
        _step_rows(kernel, bucket, indices, scalars, rounding, finite, options)
        return
    buffers = _PackBuffers()
    numels = {i: bucket.params[i].numel() for i in indices}
    for pack in _packs(indices, numels, max(options.chunk_size, MIN_CALL_NUMEL)):
        first = pack[0]
        if len(pack) == 1 and numels[first] < MIN_CALL_NUMEL:
            # One element alone: a call would compile a kernel of its own; the eager step instead.
            kernel.later(_step_eager, bucket, pack, scalars, options, eager.StateRounding(), finite)
            continue
        guard = None
        if finite is not None:
            guard = eager._Guard(eager._Chunk([(i, 0, numels[i]) for i in pack]), finite, guarded(bucket))
        stored = [[t[i] for i in pack] for t in bucket]
        if len(pack) == 1:
            kernel(*(ts[0] for ts in stored), first, (None, None), None)
        else:
            sizes = [numels[i] for i in pack]
            numel = sum(sizes)
            packed = [buffers.gather(operand, ts, numel) for operand, ts in enumerate(stored)]
            kernel(*packed, first, (None, None), None)
            _copy_back(stored, packed, sizes)
        if guard is not None:
            guard.restore()


def _packs(indices: list[int], numels: dict[int, int], limit: int) -> list[list[int]]:
    """Whole non-empty tensors, in order, gathered into packs of at most ``limit`` elements (or one tensor)."""
    packs: list[list[int]] = []
    current: list[int] = []
    room = limit
    for i in indices:
        numel = numels[i]
        if numel == 0:
            continue
        if numel > room and current:
            packs.append(current)
            current, room = [], limit
        current.append(i)
        room -= numel
    if current:
        packs.append(current)
    return packs


def _step_rows(kernel, bucket, indices, scalars, rounding, finite, options) -> None:
    """Step small tensors with stochastically rounded moments: tensors of one size are gathered as the rows of a pack
    (at most ``chunk_size`` elements, or two rows), one kernel call each, each row drawing its tensor's own bits."""
    by_size: dict[int, list[int]] = {}
    for i in indices:
        by_size.setdefault(bucket.params[i].numel(), []).append(i)
    device = bucket.params[0].device
    buffers = _PackBuffers()
    for size, members in by_size.items():
        if size < MIN_CALL_NUMEL:
            # Empty or one element: nothing to do, or a call that would compile a kernel of its own; eager.
            if size:
                kernel.later(_step_eager, bucket, members, scalars, options, rounding, finite)
            continue
        per_pack = max(2, options.chunk_size // size)
        for start in range(0, len(members), per_pack):
            rows = members[start : start + per_pack]
            guard = (
                None
                if finite is None
                else eager._Guard(eager._Chunk([(i, 0, size) for i in rows]), finite, guarded(bucket))
            )
            if len(rows) == 1:
                (i,) = rows
                kernel(*(t[i] for t in bucket), i, *stream_inputs(rounding, i, device))
            else:
                _step_pack_of_rows(kernel, bucket, rows, size, rounding, device, buffers)
            if guard is not None:
                guard.restore()


def _step_pack_of_rows(kernel, bucket, rows, size, rounding, device, buffers) -> None:
    stored = [[t[i] for i in rows] for t in bucket]
    packed = [buffers.gather(operand, ts, len(rows) * size).view(len(rows), size) for operand, ts in enumerate(stored)]
    keys = tuple(
        None
        if streams is None
        else torch.tensor([as_int32(streams[i].key) for i in rows], dtype=torch.int32, device=device)
        for streams in rounding
    )
    layouts = next(s for s in rounding if s is not None)
    base = torch.tensor([as_int32(layouts[i].layout.base) for i in rows], dtype=torch.int32, device=device)
    kernel(*packed, rows[0], keys, base)
    _copy_back(stored, packed, [size] * len(rows))


def _step_eager(bucket, members, scalars, options, rounding, finite) -> None:
    sub = eager.Bucket(*([t[i] for i in members] for t in bucket))
    sub_rounding = eager.StateRounding(*(None if s is None else [s[i] for i in members] for s in rounding))
    # The step scalars by one gather each, not a 0-dim tensor per tensor.
    sub_scalars = (scalars[0][members], scalars[1][members])
    eager.compensated_step(sub, sub_scalars, options, sub_rounding, None if finite is None else finite[members])
