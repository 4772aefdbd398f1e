"""The step counts and per-tensor step scalars both CompensatedAdamW steps use (optim/_reference_step.py)."""

from __future__ import annotations

import math

import torch

from lightning_precision.optim._reference_step import advance_steps, step_scalars

GROUP = {"betas": (0.9, 0.999), "lr": 1e-3}


def test_each_step_count_advances_by_one_and_gets_its_own_scalars():
    counts = [0.0, 5.0, 0.0, 41.0, 5.0, 0.0]  # tensors of shared and of distinct counts
    steps = [torch.tensor(c) for c in counts]
    advanced = advance_steps(steps)
    neg_step_size, bc2_sqrt = step_scalars(GROUP, advanced, torch.device("cpu"), unbind=False)
    assert [s.item() for s in steps] == advanced == [c + 1 for c in counts]
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)
    for i, count in enumerate(counts):
        t = count + 1
        assert neg_step_size[i].item() == torch.tensor(-1e-3 / (1 - 0.9**t), dtype=torch.float32).item()
        assert bc2_sqrt[i].item() == torch.tensor(math.sqrt(1 - 0.999**t), dtype=torch.float32).item()


def test_tensors_of_one_count_stay_separate_tensors():
    steps = [torch.tensor(3.0) for _ in range(4)]
    advance_steps(steps)
    steps[0].add_(10.0)  # a later change to one tensor's count leaves the others alone
    assert [s.item() for s in steps] == [14.0, 4.0, 4.0, 4.0]


def test_counts_past_fp32_integers_advance_as_an_in_place_fp32_add_would():
    counts = [2.0**24, 2.0**24 + 2, 7.0]
    steps = [torch.tensor(c) for c in counts]
    expected = [torch.tensor(c).add_(1.0).item() for c in counts]
    assert advance_steps(steps) == expected
    assert [s.item() for s in steps] == expected
