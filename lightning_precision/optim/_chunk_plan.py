"""Where :class:`~lightning_precision.optim.CompensatedAdamW`'s step finds its elements and how it cuts them: flat
local views of parameters and state (DTensor shards included), chunk plans over them, and the chunk size that keeps
the step's temporaries within budget. Shared by the eager, compiled and reference steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_precision.optim._dtensor import dtensor_type
from lightning_precision.optim._stochastic_rounding import TEMP_BYTES_PER_ELEMENT as ROUNDING_TEMP_BYTES
from lightning_precision.optim._stochastic_rounding import memory_order

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


def step_temporaries(options: dict[str, Any]) -> tuple[float, float]:
    """What one step of ``CompensatedAdamW`` allocates on top of the steady state, per parameter of the model.

    The chunked and compiled steps stay under ``TRANSIENT_BUDGET``. The reference step holds, for a whole group at
    once, an fp32 copy of the gradient, the parameter, the compensation and each moment not stored in fp32: 16 B/param
    with an fp32 second moment, 20 with the default bf16 one (both measured by ``benchmarks/optimizer_step.py``).

    Args:
        options: The optimizer's complete options, as ``_compensated_options.check_options`` returns them.

    Returns:
        ``(copies of the parameters, extra bytes)``, as the optimizer catalogue reads it.
    """
    if options["implementation"] != "reference":
        return (0.0, TRANSIENT_BUDGET)
    fp32_copies = 3 + (options["exp_avg_dtype"] != "float32") + (options["exp_avg_sq_dtype"] != "float32")
    return (0.0, 4.0 * fp32_copies)


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


def flat_local_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D views of the local data of tensors that line up element by element, or None if they do not.

    DTensors (FSDP2 shards) are replaced by their local tensors when all of them share one mesh and placements, so
    the step reads and writes the shard in place and never redistributes. Tensors of the same shape and strides that
    are contiguous up to a permutation of their dimensions (e.g. channels-last) are viewed in memory order.

    Args:
        tensors: A parameter, its gradient and its state tensors.

    Returns:
        One flat view per tensor, aliasing its storage (a 1-D contiguous tensor itself), or None when the tensors mix DTensor and plain tensors,
        differ in mesh, placements, shape or strides, or have gaps or overlaps in memory (the caller then uses the
        reference step for them).
    """
    dtensor = dtensor_type()
    first = tensors[0]
    if not isinstance(first, dtensor):
        # The common case, checked with as few calls as possible (a model of 5,000 tensors pays it every step).
        shape = first.shape
        if first.is_contiguous():
            # Contiguous tensors of one shape line up element by element (their strides may differ only along
            # dimensions of size 1), and is_contiguous allocates nothing, where stride() builds a tuple.
            for t in tensors:
                if isinstance(t, dtensor) or t.shape != shape or not t.is_contiguous():
                    return None
            # A 1-D contiguous tensor is its own flat view.
            return list(tensors) if first.dim() == 1 else [t.view(-1) for t in tensors]
        strides = first.stride()
        for t in tensors:
            if isinstance(t, dtensor) or t.shape != shape or t.stride() != strides:
                return None
    else:
        if not all(
            isinstance(t, dtensor) and t.device_mesh == first.device_mesh and t.placements == first.placements
            for t in tensors
        ):
            return None
        tensors = [t.to_local() for t in tensors]
        shape, strides = tensors[0].shape, tensors[0].stride()
        if any(t.shape != shape or t.stride() != strides for t in tensors):
            return None
        if tensors[0].is_contiguous():
            return [t.view(-1) for t in tensors]
    order = memory_order(shape, strides)
    permuted = [t.permute(order) for t in tensors]
    if not all(t.is_contiguous() for t in permuted):
        return None
    return [t.reshape(-1) for t in permuted]
