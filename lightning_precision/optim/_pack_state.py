"""The optimizer state of packed small tensors, kept in one buffer per pack so the compiled step writes it in place.

The compiled step (:mod:`~lightning_precision.optim._compiled_step`) steps tensors under ``PACK_BELOW`` elements in
packs: one kernel call per pack, on flat buffers. Gathering every operand into a buffer and copying the results back
cost more than the kernel itself with 5,000 small tensors. The parameters and gradients belong to the model and are
still gathered; the moments and the compensation belong to the optimizer, so each is moved, once, into one buffer per
pack, and the pack's state entries become views of it: the same values, dtypes, shapes and strides, saved by
``state_dict()`` as before. From then on the kernel reads and writes that buffer in place.

Nothing is cached across steps: every step checks, from the tensors themselves (their storage and addresses), that
the pack's state still lies in one buffer in the pack's order. A state that was loaded, converted or replaced since,
or a pack whose members changed (a parameter without a gradient this step), is moved again; that step costs what the
gather and copy-back cost before. The move allocates one pack's operand at a time (packs are bounded by the chunk
budget), so the peak stays within a pack of the steady state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# The state keys of the bucket's optimizer-owned operands, by bucket field.
STATE_KEYS = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "comps": "compensation"}


def packable_states(state: Any, owners: Sequence[torch.Tensor]) -> list[dict[str, Any]] | None:
    """The optimizer state dicts of ``owners`` if their state may move into pack buffers: plain tensors only (a
    DTensor parameter's state stays a DTensor, as distributed checkpointing expects), else None."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in owners):
        return None
    return [state[p] for p in owners]


def span(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view covering flat ``tensors`` that lie one after the other in the first one's storage, or None."""
    first = tensors[0]
    start = address = first.data_ptr()
    itemsize = first.element_size()
    for t in tensors:
        if t.data_ptr() != address:
            return None
        address += t.numel() * itemsize
    storage = first.untyped_storage()
    # Consecutive addresses within one storage's bytes are that storage's (allocations do not overlap): one check.
    if address > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided(((address - start) // itemsize,), (1,))


def state_buffer(bucket: Any, states: Sequence[dict[str, Any]], pack: Sequence[int], field: str) -> torch.Tensor:
    """The buffer holding ``field`` (a bucket field of :data:`STATE_KEYS`) for the tensors of ``pack``, in pack order.

    If the pack's state does not lie so, it is copied into a new buffer and the state entries (``states``, aligned
    with the bucket) and the bucket's flat views are replaced by views of it.

    Args:
        bucket: The compiled step's bucket (flat local views), updated in place where the state moves.
        states: The optimizer state dict of each bucket entry's parameter (plain tensors, not DTensors).
        pack: Bucket indices of the pack's tensors.
        field: ``"exp_avgs"``, ``"exp_avg_sqs"`` or ``"comps"``.
    """
    views = getattr(bucket, field)
    current = [views[i] for i in pack]
    found = span(current)
    if found is not None:
        return found
    key = STATE_KEYS[field]
    buffer = torch.cat(current)
    offset = 0
    for i, flat in zip(pack, current):
        numel = flat.numel()
        held = states[i][key]
        # The state tensor's own strides (channels-last stays so): its memory order is the flat view's order.
        states[i][key] = buffer.as_strided(held.shape, held.stride(), offset)
        views[i] = buffer[offset : offset + numel]
        offset += numel
    return buffer
