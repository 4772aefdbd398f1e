"""Arguments of one call of the compiled step's kernel, for the tests that compile or check it directly."""

from __future__ import annotations

import torch

from lightning_precision.optim import _compensated_step as eager
from lightning_precision.optim import _compiled_step


def kernel_arguments(rows: bool, stochastic: bool, numel: int = 8) -> tuple:
    """``(p, g, m, v, c, scalars, flags, keys, base)`` of zeros: flat ``numel`` elements, or 3 rows of ``numel``;
    ``stochastic``: a bf16 second moment with its key (else an fp32 one)."""
    shape = (3, numel) if rows else (numel,)
    p, g, m, c = (torch.zeros(shape, dtype=torch.bfloat16) for _ in range(4))
    v = torch.zeros(shape, dtype=torch.bfloat16 if stochastic else torch.float32)
    hyper = eager.Hyper(0.1, 0.999, 0.001, 1e-8, -1e-5, True, False)
    scalars = _compiled_step.kernel_scalars(hyper, torch.tensor([-1e-3]), torch.tensor([0.0316]))[0]
    key_shape = (3,) if rows else ()
    keys = (None, torch.full(key_shape, 12345, dtype=torch.int32)) if stochastic else (None, None)
    base = torch.zeros(key_shape, dtype=torch.int32) if stochastic else None
    return (p, g, m, v, c, scalars, (hyper.decays, hyper.maximize), keys, base)
