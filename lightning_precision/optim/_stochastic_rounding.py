"""Counter-based stochastic rounding of CompensatedAdamW's fp32 moments into bfloat16 storage.

Rounded to nearest, a bf16 second moment cannot follow ``beta2=0.999``: the 0.1% EMA step is below half a bf16 ulp,
so every write rounds back to the old value. Rounded stochastically (up with probability equal to the distance from
the lower neighbour, in ulps), each write is unbiased and the stored moment decays in expectation as the fp32 one does.

The random bits are a hash of ``(seed, step, parameter index, moment, global element index)``. No generator state
exists, so nothing extra is checkpointed, a resumed run draws the same bits as an uninterrupted one, and an element
gets the same bits whatever the rank count, the sharding (the index is the element's position in the full, unsharded
tensor), the chunking of the step or the order tensors are processed in.

bf16 is the top half of an fp32 bit pattern, so rounding is integer arithmetic on the pattern: add 16 random bits and
clear the low 16. Finite values round towards the two bf16 neighbours of their magnitude; infinities stay infinite.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_precision.optim._dtensor import dtensor_type

ROUNDINGS = ("nearest", "stochastic")
# Bytes per chunk element of the temporaries of one stochastic write, at most: four int64 tensors while the global
# index of a sharded or permuted layout is computed (position, index, coordinate, quotient), and the int32 pattern.
TEMP_BYTES_PER_ELEMENT = 4 * 8 + 4

_MASK32 = 0xFFFFFFFF
_LOW16_CLEARED = -(1 << 16)  # 0xFFFF0000 as an int32
# Moment ids in the hash: the two moments of one parameter at one step draw independent bits.
_MOMENT_IDS = {"exp_avg": 1, "exp_avg_sq": 2}


def _mix32_int(x: int) -> int:
    """A 32-bit integer finaliser (xor-shift-multiply), for the per-tensor key on the host."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def as_int32(x: int) -> int:
    """The int32 with the bit pattern of the 32-bit unsigned ``x`` (torch has no full uint32 arithmetic)."""
    x &= _MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def _shifted_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # A logical shift of the uint32 pattern: int32 ``>>`` copies the sign bit, the mask clears the copies.
    return (x >> bits).bitwise_and_((1 << (32 - bits)) - 1)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """The same finaliser, in place, on int64 values in ``[0, 2**32)`` or on int32 tensors of uint32 bit patterns.

    int64 lanes (the eager step): products may pass 2**63 and wrap; the mask keeps their low 32 bits, which wrapping
    preserves. int32 lanes (the compiled kernel: half the width, no mask after a product): products wrap modulo
    2**32, keeping the low 32 bits of the unsigned product, and the shifts are made logical. On CPU the eager ops on
    int32 with a scalar cost ~0.5 us more each than on int64, which a step over 5,000 small tensors pays per op.
    """
    wide = x.dtype == torch.int64
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        x.bitwise_xor_(x >> shift if wide else _shifted_right(x, shift))
        if factor is not None and wide:
            x.mul_(factor).bitwise_and_(_MASK32)
        elif factor is not None:
            x.mul_(as_int32(factor))
    return x


@functools.lru_cache(maxsize=64)
def _step_key(seed: int, step: int) -> int:
    """The part of :func:`stream_key` shared by every parameter at one step (computed once per step, not per tensor)."""
    key = _mix32_int(seed ^ 0x9E3779B9)
    key = _mix32_int(key ^ (seed >> 32))
    key = _mix32_int(key ^ step)
    return _mix32_int(key ^ (step >> 32))


def stream_key(seed: int, step: int, param_index: int, moment: str) -> tuple[int, int]:
    """Two 32-bit keys for one moment of one parameter at one step (the second mixes in high index bits)."""
    key = _mix32_int(_step_key(seed, step) ^ param_index)
    key = _mix32_int(key ^ _MOMENT_IDS[moment])
    return key, _mix32_int(key ^ 0x85EBCA6B)


@dataclass(frozen=True)
class ElementLayout:
    """Where the elements of a local (flat, memory-ordered) tensor sit in the full tensor, in row-major order.

    Attributes:
        base: Global index of local element 0 when the local elements are one contiguous range of the full tensor
            (a plain tensor, a replicated one, a dim-0 shard); ``None`` otherwise.
        local_shape: Shape of the local tensor, in memory order (outermost first).
        dims: The logical dimension of each memory-order dimension.
        offsets: Global offset of the local tensor along each logical dimension.
        global_strides: Row-major strides of the full tensor, by logical dimension.
        global_numel: Elements of the full tensor (the hash reads high index bits only when it has 2**32 or more).
    """

    base: int | None
    local_shape: tuple[int, ...]
    dims: tuple[int, ...]
    offsets: tuple[int, ...]
    global_strides: tuple[int, ...]
    global_numel: int

    def global_indices(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Global row-major indices (int64) of the local elements ``start:stop`` in memory order."""
        position = torch.arange(start, stop, dtype=torch.int64, device=device)
        if self.base is not None:
            return position.add_(self.base)
        index = torch.zeros_like(position)
        for size, dim in zip(reversed(self.local_shape), reversed(self.dims)):
            coordinate = position.remainder(size)
            position = position.div(size, rounding_mode="floor")
            index.add_(coordinate.add_(self.offsets[dim]).mul_(self.global_strides[dim]))
        return index


def memory_order(shape: Sequence[int], strides: Sequence[int]) -> list[int]:
    """The dimensions of a tensor from outermost to innermost in memory (the order its flat view walks them)."""
    return sorted(range(len(shape)), key=lambda d: (-strides[d], -shape[d]))


def element_layout(param: torch.Tensor) -> ElementLayout:
    """The :class:`ElementLayout` of ``param``'s local data (its local shard for a DTensor).

    Args:
        param: A parameter, plain or DTensor, whose local data is dense in some dimension order.

    Returns:
        The layout that maps the flat local view (as ``flat_local_views`` builds it) to global indices.
    """
    if not isinstance(param, dtensor_type()):
        return _plain_layout(param.shape, param.stride())
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    global_shape = tuple(param.shape)
    _, offsets = compute_local_shape_and_global_offset(global_shape, param.device_mesh, param.placements)
    return _layout(tuple(local.shape), local.stride(), global_shape, tuple(offsets))


@functools.lru_cache(maxsize=4096)
def _plain_layout(shape: torch.Size, strides: tuple[int, ...]) -> ElementLayout:
    return _layout(tuple(shape), strides, tuple(shape), (0,) * len(shape))


# A pure function of its arguments, cached: a model of thousands of tensors has few distinct shapes, and the layout
# is asked for every tensor at every step.
@functools.lru_cache(maxsize=4096)
def _layout(
    local_shape: tuple[int, ...],
    local_strides: tuple[int, ...],
    global_shape: tuple[int, ...],
    offsets: tuple[int, ...],
) -> ElementLayout:
    global_strides, stride = [0] * len(global_shape), 1
    for d in reversed(range(len(global_shape))):
        global_strides[d] = stride
        stride *= global_shape[d]
    order = memory_order(local_shape, local_strides)
    row_major = order == list(range(len(local_shape)))
    contiguous_range = row_major and all(o == 0 for o in offsets[1:]) and local_shape[1:] == global_shape[1:]
    base = None
    if contiguous_range:
        base = offsets[0] * global_strides[0] if offsets else 0
    return ElementLayout(
        base=base,
        local_shape=tuple(local_shape[d] for d in order),
        dims=tuple(order),
        offsets=offsets,
        global_strides=tuple(global_strides),
        global_numel=stride,
    )


@dataclass(frozen=True)
class RoundingStream:
    """The random bits of one moment of one parameter at one step."""

    layout: ElementLayout
    key: int
    high_key: int

    def random_bits(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """16 random bits (int64 values in ``[0, 2**16)``) for the local elements ``start:stop``."""
        index = self.layout.global_indices(start, stop, device)
        high = index >> 32 if self.layout.global_numel > _MASK32 else None
        bits = _mix32_(index.bitwise_and_(_MASK32).bitwise_xor_(self.key))
        if high is not None:
            bits = _mix32_(bits.bitwise_xor_(high.bitwise_xor_(self.high_key)))
        return bits.bitwise_right_shift_(16)  # the hash's high bits mix best


def range_bits(
    start: int, stop: int, base: int | torch.Tensor, key: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """:meth:`RoundingStream.random_bits` (as int32) of local elements ``start:stop`` whose global indices are
    ``base + start ...``, under 2**32: int32 all along, the sum wrapping modulo 2**32 (the compiled kernel's lanes).
    ``base`` and ``key`` are uint32 bit patterns as int32, ints or 0-dim tensors (inputs of the compiled kernel)."""
    index = torch.arange(start, stop, dtype=torch.int32, device=device).add_(base)
    return _shifted_right(_mix32_(index.bitwise_xor_(key)), 16)


def stream_for(layout: ElementLayout, seed: int, step: int, param_index: int, moment: str) -> RoundingStream:
    """The :class:`RoundingStream` of ``moment`` of the parameter at ``param_index`` in its optimizer at ``step``."""
    return streams_for([layout], seed, [step], [param_index], moment)[0]


def streams_for(
    layouts: Sequence[ElementLayout], seed: int, steps: Sequence[int], param_indices: Sequence[int], moment: str
) -> list[RoundingStream]:
    """:func:`stream_for` of many parameters at once, their keys hashed as one int64 tensor (a step of 5,000 tensors
    spent 6 ms hashing them one by one in Python): bit for bit the keys of :func:`stream_key`, the hash's reference."""
    if not layouts:
        return []
    by_step = {step: _step_key(seed, step) for step in set(steps)}
    x = torch.tensor([by_step[step] for step in steps], dtype=torch.int64)
    x.bitwise_xor_(torch.tensor(param_indices, dtype=torch.int64).bitwise_and_(_MASK32))
    key = _mix32_(_mix32_(x).bitwise_xor_(_MOMENT_IDS[moment]))
    high_key = _mix32_(key.bitwise_xor(0x85EBCA6B))
    return [RoundingStream(*s) for s in zip(layouts, key.tolist(), high_key.tolist())]


def round_into_(
    dst: torch.Tensor, src: torch.Tensor, stream: RoundingStream, start: int, scratch: torch.Tensor
) -> None:
    """Write the fp32 ``src`` into the bf16 ``dst``, rounded stochastically, without changing ``src``.

    Args:
        dst: bf16 slice of a stored moment (local elements ``start:start + numel``).
        src: fp32 values of the same elements.
        stream: The moment's random bits.
        start: Position of ``dst``'s first element in its flat local tensor.
        scratch: int32 tensor with room for ``src.numel()`` elements.
    """
    n = src.numel()
    pattern = scratch[:n]
    pattern.copy_(stream.random_bits(start, start + n, src.device))
    pattern.add_(src.view(torch.int32)).bitwise_and_(_LOW16_CLEARED)
    dst.copy_(pattern.view(torch.float32))  # exact: the low 16 bits are zero
