"""The tensors a CompensatedAdamW step collects: built afresh each step, so every change between steps is seen."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_precision.optim import CompensatedAdamW, _buckets

BF16 = torch.bfloat16


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.full_like(p, 1e-2)


@pytest.mark.parametrize("implementation", ["chunked", "compiled", "reference"])
def test_only_parameters_with_a_gradient_now_are_stepped(implementation):
    a, b = (torch.nn.Parameter(torch.randn(300).to(BF16)) for _ in range(2))
    opt = CompensatedAdamW([a, b], implementation=implementation)
    a.grad = _grad(a)
    opt.step()
    a.grad, b.grad = None, _grad(b)  # a loses its gradient, b gains one
    before = a.detach().clone()
    opt.step()
    assert opt.state[a]["step"].item() == 1.0 and torch.equal(a.detach(), before)
    assert opt.state[b]["step"].item() == 1.0 and opt.state[b]["compensation"].dtype == BF16


def test_a_parameter_that_changes_dtype_between_steps_gets_state_of_its_new_dtype():
    p = torch.nn.Parameter(torch.randn(64).to(BF16))
    opt = CompensatedAdamW([p], implementation="chunked")
    p.grad = _grad(p)
    opt.step()
    p.data, p.grad = p.data.float(), torch.zeros(64)
    opt.step()
    assert "compensation" not in opt.state[p] and opt.state[p]["exp_avg"].dtype == torch.float32
    p.data, p.grad = p.data.to(BF16), torch.zeros(64, dtype=BF16)
    opt.step()
    assert opt.state_dtypes(p) == {k: opt.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")}


def test_a_changed_group_dtype_option_and_an_added_group_are_seen_at_the_next_step():
    a, b = (torch.nn.Parameter(torch.randn(64).to(BF16)) for _ in range(2))
    opt = CompensatedAdamW([a], implementation="chunked", exp_avg_sq_dtype="float32")
    a.grad = _grad(a)
    opt.step()
    assert opt.state[a]["exp_avg_sq"].dtype == torch.float32
    opt.param_groups[0]["exp_avg_sq_dtype"] = "bfloat16"
    opt.add_param_group({"params": [b], "exp_avg_dtype": "float32"})
    b.grad = _grad(b)
    opt.step()
    assert opt.state[a]["exp_avg_sq"].dtype == BF16
    assert opt.state[b]["exp_avg"].dtype == torch.float32 and opt.state[b]["step"].item() == 1.0


def test_a_loaded_state_is_the_one_stepped():
    p = torch.nn.Parameter(torch.randn(64).to(BF16))
    opt = CompensatedAdamW([p], implementation="chunked")
    p.grad = _grad(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    opt.step()
    opt.load_state_dict(saved)
    loaded = opt.state[p]["exp_avg"]
    opt.step()
    assert opt.state[p]["exp_avg"] is loaded and opt.state[p]["step"].item() == 2.0


def test_one_dimensional_contiguous_tensors_are_their_own_flat_views():
    p = torch.nn.Parameter(torch.randn(10).to(BF16))
    w = torch.nn.Parameter(torch.randn(2, 5).to(BF16))
    opt = CompensatedAdamW([p, w], implementation="chunked")
    p.grad, w.grad = _grad(p), _grad(w)
    opt.step()
    ((_, _, bucket),), numel = _buckets.collect(opt)
    assert bucket[0][0] is p and bucket[2][0] is opt.state[p]["exp_avg"]
    assert bucket[0][1].shape == (10,) and bucket[0][1].data_ptr() == w.data_ptr()
    assert numel == 20
