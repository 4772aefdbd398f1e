"""DTensor, looked up once: the optimizer's per-tensor paths ask whether a tensor is one for every tensor at every
step, and an import statement per tensor costs a step of 5,000 tensors milliseconds."""

from __future__ import annotations

import functools

import torch


@functools.cache
def dtensor_type() -> type:
    """``torch.distributed.tensor.DTensor`` (imported on first use)."""
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local data of a DTensor, or ``t`` itself."""
    return t.to_local() if isinstance(t, dtensor_type()) else t
