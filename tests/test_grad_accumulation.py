"""Fp32GradAccumulator: micro-batch gradients of half parameters summed in fp32."""

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError
from lightning_precision.grad_accumulation import (
    Fp32GradAccumulator,
    accumulation_dtype,
    describe_accumulation,
    parse_accumulate_grad_dtype,
)

MICRO_BATCHES = 16


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _batches(n: int = MICRO_BATCHES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Mixed scales: a few large micro-batch gradients and many small ones, where a half running sum loses bits.
    return [torch.randn(4, 8, generator=g) * (10.0 if i % 5 == 0 else 0.05) for i in range(n)]


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    dtype = next(model.parameters()).dtype
    (model(x.to(dtype)).float().square().mean() / MICRO_BATCHES).backward()


def _fp32_reference_sum(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each micro-batch's half gradient computed alone, summed in fp32."""
    model = _model(dtype)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for x in _batches():
        model.zero_grad(set_to_none=True)
        _backward(model, x)
        for n, p in model.named_parameters():
            total[n] += p.grad.float()
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hooked_sum_equals_the_fp32_reference_sum(dtype):
    model = _model(dtype)
    accumulator = Fp32GradAccumulator()
    assert accumulator.attach(model.named_parameters()) == 4
    for x in _batches():
        _backward(model, x)
        assert all(p.grad is None for p in model.parameters())  # moved into the buffers at once
    assert accumulator.hand_over() == 4
    reference = _fp32_reference_sum(dtype)
    for n, p in model.named_parameters():
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, reference[n].to(dtype), rtol=0, atol=0)
    assert not accumulator.pending


def test_autograds_half_running_sum_differs_from_the_fp32_sum():
    """What the buffers are for: the same micro-batches summed by autograd in bf16 land elsewhere."""
    model = _model(torch.bfloat16)
    for x in _batches():
        _backward(model, x)
    reference = _fp32_reference_sum(torch.bfloat16)
    differs = sum(int((p.grad != reference[n].bfloat16()).sum()) for n, p in model.named_parameters())
    assert differs > 0


def test_fp32_parameters_are_left_to_autograd():
    model = _model(torch.float32)
    accumulator = Fp32GradAccumulator()
    assert accumulator.attach(model.named_parameters()) == 0
    _backward(model, _batches()[0])
    assert all(p.grad is not None for p in model.parameters())
    assert not accumulator.pending


def test_inactive_hooks_leave_the_gradient_to_autograd_and_hand_over_adds_it():
    model = _model(torch.bfloat16)
    active = [True]
    accumulator = Fp32GradAccumulator()
    accumulator.attach(model.named_parameters(), active=lambda: active[0])
    batches = _batches()
    _backward(model, batches[0])
    active[0] = False
    _backward(model, batches[1])
    assert all(p.grad is not None for p in model.parameters())
    accumulator.hand_over()
    expected = _model(torch.bfloat16)
    _backward(expected, batches[0])
    first = {n: p.grad.float() for n, p in expected.named_parameters()}
    expected.zero_grad(set_to_none=True)
    _backward(expected, batches[1])
    for (n, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(p.grad, (first[n] + q.grad.float()).bfloat16(), rtol=0, atol=0)


def test_collect_sweeps_gradients_written_outside_autograd_hooks():
    model = _model(torch.bfloat16)
    accumulator = Fp32GradAccumulator()
    for x in _batches():
        _backward(model, x)
        accumulator.collect(model.named_parameters())
        assert all(p.grad is None for p in model.parameters())
    accumulator.hand_over()
    reference = _fp32_reference_sum(torch.bfloat16)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n].bfloat16(), rtol=0, atol=0)


def test_state_dict_round_trip_continues_the_sum():
    batches = _batches()
    model = _model(torch.bfloat16)
    first = Fp32GradAccumulator()
    first.attach(model.named_parameters())
    for x in batches[:5]:
        _backward(model, x)
        first.end_micro_batch()
    state = first.state_dict()
    assert state["micro_batches"] == 5 and set(state["buffers"]) == {n for n, _ in model.named_parameters()}
    assert all(b.dtype == torch.float32 for b in state["buffers"].values())

    resumed_model = _model(torch.bfloat16)
    resumed = Fp32GradAccumulator()
    resumed.attach(resumed_model.named_parameters())
    resumed.load_state_dict({**state, "buffers": {n: b.clone() for n, b in state["buffers"].items()}},
                            resumed_model.named_parameters())  # fmt: skip
    assert resumed.micro_batches == 5
    for x in batches[5:]:
        _backward(resumed_model, x)
    resumed.hand_over()
    reference = _fp32_reference_sum(torch.bfloat16)
    for n, p in resumed_model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n].bfloat16(), rtol=0, atol=0)


def test_state_dict_naming_an_unknown_parameter_is_refused():
    model = _model(torch.bfloat16)
    accumulator = Fp32GradAccumulator()
    with pytest.raises(PrecisionConfigError, match="'encoder.weight'"):
        accumulator.load_state_dict({"buffers": {"encoder.weight": torch.zeros(2)}}, model.named_parameters())


@pytest.mark.parametrize("value", ["float32", "fp32", torch.float32])
def test_float32_spellings_are_accepted(value):
    assert parse_accumulate_grad_dtype(value, what="X(accumulate_grad_dtype=...)") is torch.float32


@pytest.mark.parametrize("value", ["bf16", "float64", "fast", 3])
def test_other_dtypes_are_refused_with_the_choices(value):
    with pytest.raises(PrecisionConfigError, match=r"X\(accumulate_grad_dtype=...\)` got .*None .*'float32'"):
        parse_accumulate_grad_dtype(value, what="X(accumulate_grad_dtype=...)")


@pytest.mark.parametrize(
    ("storage", "option", "expected"),
    [
        (torch.bfloat16, None, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, None, torch.float32),
    ],
)
def test_accumulation_dtype_follows_storage_unless_half_with_buffers(storage, option, expected):
    assert accumulation_dtype(storage, option) is expected


def test_describe_accumulation():
    assert describe_accumulation(16, torch.bfloat16) == "16 micro-batches summed in bfloat16"
    assert describe_accumulation(1, torch.bfloat16) == "1 micro-batch (no accumulation)"


def test_attaching_to_replaced_parameters_lets_the_old_ones_go():
    import gc
    import weakref

    old = _model(torch.bfloat16)
    accumulator = Fp32GradAccumulator()
    accumulator.attach(old.named_parameters())
    gone = weakref.ref(old[0].weight)
    new = _model(torch.bfloat16)  # what fully_shard does: the module gets new parameter objects
    accumulator.ensure_attached(new.named_parameters())
    del old
    gc.collect()
    assert gone() is None
    _backward(new, _batches()[0])
    assert accumulator.pending and all(p.grad is None for p in new.parameters())


def _hooks(model: nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


def test_release_removes_the_hooks_and_leaves_gradients_to_autograd():
    model = _model(torch.bfloat16)
    accumulator = Fp32GradAccumulator()
    accumulator.attach(model.named_parameters())
    _backward(model, _batches()[0])
    accumulator.release()
    assert _hooks(model) == 0 and not accumulator.pending
    _backward(model, _batches()[1])
    assert all(p.grad is not None for p in model.parameters())


def test_release_lets_the_model_and_the_activity_predicate_go():
    import gc
    import weakref

    class Run:  # stands in for the Trainer the predicate reads
        accumulating = True

    model, run = _model(torch.bfloat16), Run()
    accumulator = Fp32GradAccumulator()
    accumulator.attach(model.named_parameters(), active=lambda: run.accumulating)
    _backward(model, _batches()[0])  # a pending sum, as a fit stopped mid-accumulation leaves
    gone_model, gone_run = weakref.ref(model), weakref.ref(run)
    accumulator.release()
    del model, run
    gc.collect()
    assert gone_model() is None and gone_run() is None


def test_a_second_accumulator_replaces_the_hooks_of_the_first():
    """Fabric has no teardown: setting the same module up again must replace the hooks, never stack them."""
    model = _model(torch.bfloat16)
    first, second = Fp32GradAccumulator(), Fp32GradAccumulator()
    first.attach(model.named_parameters())
    second.attach(model.named_parameters())
    assert _hooks(model) == 4
    for x in _batches():
        _backward(model, x)
    assert not first.pending
    second.hand_over()
    reference = _fp32_reference_sum(torch.bfloat16)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n].bfloat16(), rtol=0, atol=0)
