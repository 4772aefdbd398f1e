"""Per-tensor finite-gradient flags on CPU: checked by concatenated runs, exact per tensor."""

from __future__ import annotations

import torch

from lightning_precision.optim import _nonfinite


def _grads(count: int = 700, numel: int = 2000) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # 700 bf16 tensors of 4,000 bytes: several runs of the check, each of many tensors.
    assert count * numel * 2 > 2 * _nonfinite._RUN_BYTES
    return [torch.randn(numel, generator=gen).to(torch.bfloat16) for _ in range(count)]


def test_flags_are_false_exactly_where_a_tensor_holds_nan_or_inf():
    grads = _grads()
    grads[137][5] = float("nan")
    grads[420][0] = float("-inf")
    grads[-1][-1] = float("inf")
    grads[3] = grads[3].reshape(40, 50)  # a 2-D gradient in a run
    grads[300] = torch.randn(2**18).to(torch.bfloat16)  # large: checked on its own
    grads[300][-1] = float("nan")
    flags = _nonfinite.finite_flags(grads)
    assert torch.nonzero(~flags).flatten().tolist() == [137, 300, 420, len(grads) - 1]


def test_huge_finite_gradients_whose_sums_overflow_are_finite():
    grads = _grads()
    grads[10].fill_(3e38)  # the sums of its run and of itself overflow; every element is finite
    grads[11][7] = float("nan")
    flags = _nonfinite.finite_flags(grads)
    assert torch.nonzero(~flags).flatten().tolist() == [11]


def test_all_finite_gradients_and_empty_ones_are_finite():
    grads = _grads()[:50] + [torch.zeros(0, dtype=torch.bfloat16)]
    assert bool(_nonfinite.finite_flags(grads).all())


def test_large_gradients_each_checked_on_its_own_are_flagged_exactly():
    # Every gradient is at least the check's run limit: each gets its own sum, none is concatenated.
    grads = [torch.randn(_nonfinite._RUN_BYTES // 2).to(torch.bfloat16) for _ in range(4)]
    grads[1][3] = float("nan")
    grads[2].fill_(3e38)  # its sum overflows; every element is finite
    grads[3][-1] = float("-inf")
    assert _nonfinite.finite_flags(grads).tolist() == [True, False, True, False]


def test_opposite_infinities_are_not_finite_though_they_cancel():
    grads = _grads()
    grads[5][0], grads[5][1] = float("inf"), float("-inf")  # inf + -inf: the run's sum and its own are nan
    big = torch.randn(2**18).to(torch.bfloat16)
    big[0], big[-1] = float("-inf"), float("inf")
    flags = _nonfinite.finite_flags([*grads, big])
    assert torch.nonzero(~flags).flatten().tolist() == [5, len(grads)]
