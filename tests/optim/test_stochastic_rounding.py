"""Stochastic rounding of CompensatedAdamW's bf16 moments: unbiased, deterministic, independent of chunking."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_precision.errors import PrecisionConfigError
from lightning_precision.optim import CompensatedAdamW
from lightning_precision.optim._stochastic_rounding import (
    ElementLayout,
    _mix32_,
    _mix32_int,
    as_int32,
    element_layout,
    range_bits,
    round_into_,
    stream_for,
    stream_key,
    streams_for,
)

N = 2**16


def _round(values: torch.Tensor, seed: int = 0, step: int = 1) -> torch.Tensor:
    out = torch.empty_like(values, dtype=torch.bfloat16)
    stream = stream_for(element_layout(values), seed, step, 0, "exp_avg_sq")
    round_into_(out, values, stream, 0, torch.empty(values.numel(), dtype=torch.int32))
    return out


def _neighbours(x: float) -> tuple[float, float]:
    """The bf16 values just below and above the fp32 value ``x`` (positive, not a bf16 value)."""
    below = torch.tensor(x).view(torch.int32).bitwise_and(-(1 << 16)).view(torch.float32).item()
    above = torch.tensor(below).view(torch.int32).add(1 << 16).view(torch.float32).item()
    return below, above


@pytest.mark.parametrize("x", [1.0 + 2**-10, 3.3e-7, 0.1, 1234.567])
def test_mean_of_rounded_values_is_the_fp32_value(x):
    rounded = _round(torch.full((N,), x)).float()
    below, above = _neighbours(x)
    assert set(rounded.unique().tolist()) <= {below, above}
    # Each draw is `below` or `above` with P(above) = (x - below) / ulp: the mean's standard error is at most
    # ulp / (2 sqrt(N)); the 16-bit noise adds a bias below ulp / 2**16. Five standard errors bound the test.
    ulp = above - below
    assert abs(rounded.mean(dtype=torch.float64).item() - x) < ulp * (5 / (2 * math.sqrt(N)) + 2**-16)


def test_rounding_to_nearest_would_fail_that_bound():
    x = 1.0 + 2**-10  # a quarter ulp above 1.0: nearest always gives 1.0
    below, above = _neighbours(x)
    nearest = torch.full((N,), x).to(torch.bfloat16).float()
    assert abs(nearest.mean().item() - x) > (above - below) * (5 / (2 * math.sqrt(N)) + 2**-16)


def test_bf16_values_are_kept_exactly():
    values = torch.randn(N).to(torch.bfloat16).float()
    assert torch.equal(_round(values).float(), values)


def test_bits_depend_on_seed_and_step_but_repeat_for_the_same_ones():
    values = torch.full((N,), 0.1)
    assert torch.equal(_round(values, seed=3, step=7), _round(values, seed=3, step=7))
    assert not torch.equal(_round(values, seed=3, step=7), _round(values, seed=4, step=7))
    assert not torch.equal(_round(values, seed=3, step=7), _round(values, seed=3, step=8))


def _second_moment_after_decay(rounding: str, steps: int = 1000) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p], lr=0.0, weight_decay=0.0, exp_avg_sq_dtype=torch.bfloat16, exp_avg_sq_rounding=rounding)
    p.grad = torch.ones_like(p)
    opt.step()  # exp_avg_sq = 1 - beta2 everywhere
    p.grad = torch.zeros_like(p)
    for _ in range(steps):
        opt.step()
    return opt.state[p]["exp_avg_sq"].float()


def test_stochastic_second_moment_decays_at_beta2_0999_like_fp32():
    expected = (1 - 0.999) * 0.999**1000
    assert _second_moment_after_decay("stochastic").mean().item() == pytest.approx(expected, rel=0.02)


def test_nearest_second_moment_cannot_decay_at_beta2_0999():
    stuck = _second_moment_after_decay("nearest")
    assert stuck.mean().item() > 2 * (1 - 0.999) * 0.999**1000


def _train(steps: int, **options) -> tuple[list[torch.Tensor], CompensatedAdamW]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 11), (4099,), (3, 5, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in shapes]
    opt = CompensatedAdamW(params, lr=1e-2, exp_avg_sq_dtype="bf16", exp_avg_sq_rounding="stochastic", **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt.step()
    return params, opt


def _state(params, opt) -> list[torch.Tensor]:
    return [t for p in params for t in (p, *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "compensation")))]


@pytest.mark.parametrize(
    "options",
    [{"chunk_size": 64}, {"chunk_size": 5000}, {"implementation": "reference"}],
    ids=["small-chunks", "packed-chunks", "reference"],
)
def test_result_does_not_depend_on_chunking(options):
    base = _state(*_train(5))
    assert all(torch.equal(a, b) for a, b in zip(base, _state(*_train(5, **options))))


def test_resume_from_state_dict_continues_bitwise():
    ref_params, ref_opt = _train(6)
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 11), (4099,), (3, 5, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in shapes]
    opt = CompensatedAdamW(params, lr=1e-2, exp_avg_sq_dtype="bf16", exp_avg_sq_rounding="stochastic")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = CompensatedAdamW(resumed, lr=5.0)  # the loaded param_groups restore lr and the rounding options
    opt2.load_state_dict(saved)
    for _ in range(3):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(_state(ref_params, ref_opt), _state(resumed, opt2)))


def test_first_moment_rounding_is_separate():
    params, opt = _train(2, exp_avg_rounding="stochastic")
    nearest_params, nearest_opt = _train(2)
    first = [(opt.state[p]["exp_avg"], nearest_opt.state[q]["exp_avg"]) for p, q in zip(params, nearest_params)]
    second = [(opt.state[p]["exp_avg_sq"], nearest_opt.state[q]["exp_avg_sq"]) for p, q in zip(params, nearest_params)]
    assert not all(torch.equal(a, b) for a, b in first)
    assert all(torch.equal(a, b) for a, b in second)  # the second moment depends on the gradients only


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"exp_avg_sq_rounding": "stochastic", "exp_avg_sq_dtype": "fp32"}, "exp_avg_sq_dtype is 'float32'"),
        ({"exp_avg_rounding": "stochastic", "exp_avg_dtype": "fp16"}, "exp_avg_dtype is 'float16'"),
        ({"exp_avg_sq_rounding": "random"}, "Invalid exp_avg_sq_rounding: 'random'; expected one of"),
        ({"rounding_seed": -1}, "Invalid rounding_seed: -1"),
        ({"rounding_seed": 1.5}, "Invalid rounding_seed: 1.5"),
    ],
)
def test_invalid_rounding_options_name_the_value_and_choices(kwargs, fragment):
    with pytest.raises(PrecisionConfigError, match=fragment.replace("(", r"\(")):
        CompensatedAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], **kwargs)


@pytest.mark.parametrize(
    ("dtype", "rounding"), [(None, "stochastic"), ("bf16", "stochastic"), ("fp32", "nearest"), ("fp16", "nearest")]
)
def test_auto_rounding_of_the_second_moment_follows_its_dtype(dtype, rounding):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p], **({} if dtype is None else {"exp_avg_sq_dtype": dtype}))
    assert opt.param_groups[0]["exp_avg_sq_rounding"] == rounding
    assert opt.defaults["exp_avg_sq_rounding"] == "auto"  # later groups resolve it for their own dtype


def test_auto_rounding_is_resolved_per_added_group():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p])
    opt.add_param_group({"params": [q], "exp_avg_sq_dtype": "fp32"})
    assert [g["exp_avg_sq_rounding"] for g in opt.param_groups] == ["stochastic", "nearest"]
    assert opt.state_dict()["param_groups"][1]["exp_avg_sq_rounding"] == "nearest"  # saved resolved, never "auto"


def test_per_group_stochastic_rounding_is_checked_against_the_group_dtype():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p], exp_avg_sq_dtype="bf16", exp_avg_sq_rounding="stochastic")
    with pytest.raises(PrecisionConfigError, match="exp_avg_sq_dtype is 'float32'"):
        opt.add_param_group({"params": [q], "exp_avg_sq_dtype": "fp32"})


def test_permuted_layout_indices_are_the_logical_row_major_ones():
    t = torch.zeros(7, 5).t()  # memory order walks t column by column
    layout = element_layout(t)
    logical = torch.arange(35).reshape(5, 7)  # row-major index of each element of t
    assert layout.base is None
    assert layout.global_indices(0, 35, torch.device("cpu")).tolist() == logical.t().reshape(-1).tolist()


def test_contiguous_layout_is_one_range():
    layout = element_layout(torch.zeros(4, 3))
    assert layout.base == 0
    assert layout.global_indices(2, 6, torch.device("cpu")).tolist() == [2, 3, 4, 5]


def test_tensor_hash_is_the_unsigned_32_bit_hash_of_the_host():
    # In int32 lanes (wrapping products, logical shifts) as in int64 ones, the tensor hash is the uint32 one: the
    # compiled and the eager step, and a resumed run, draw the bits the host-side definition gives.
    values = [0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]
    values += torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    expected = [_mix32_int(v) for v in values]
    narrow = _mix32_(torch.tensor([as_int32(v) for v in values], dtype=torch.int32))
    assert [h & 0xFFFFFFFF for h in narrow.tolist()] == expected
    assert _mix32_(torch.tensor(values, dtype=torch.int64)).tolist() == expected


def test_random_bits_of_a_tensor_of_2_32_elements_or_more_mix_the_high_index_bits():
    base = 3 * 2**32 + 2**31 - 4  # a shard whose indices cross 2**31 in their low 32 bits
    layout = ElementLayout(base, (8,), (0,), (0,), (1,), 2**34)
    stream = stream_for(layout, seed=5, step=2, param_index=1, moment="exp_avg")
    expected = []
    for index in range(base, base + 8):
        low = _mix32_int((index & 0xFFFFFFFF) ^ stream.key)
        expected.append(_mix32_int(low ^ (index >> 32) ^ stream.high_key) >> 16)
    assert stream.random_bits(0, 8, torch.device("cpu")).tolist() == expected


def test_int32_bits_of_a_range_crossing_2_31_are_the_streams():
    base = 2**31 - 4  # the int32 sum of the compiled kernel's lanes wraps here
    layout = ElementLayout(base, (8,), (0,), (0,), (1,), 2**32 - 1)
    stream = stream_for(layout, seed=5, step=2, param_index=1, moment="exp_avg_sq")
    expected = [_mix32_int(index ^ stream.key) >> 16 for index in range(base, base + 8)]
    assert stream.random_bits(0, 8, torch.device("cpu")).tolist() == expected
    assert range_bits(0, 8, as_int32(base), as_int32(stream.key), torch.device("cpu")).tolist() == expected


@pytest.mark.parametrize("moment", ["exp_avg", "exp_avg_sq"])
def test_streams_for_many_parameters_have_each_parameters_own_keys(moment):
    # Hashed together as one int64 tensor, the keys are those of stream_key (the hash in Python ints), parameter by
    # parameter: steps that differ between parameters, steps and indices past 2**32, a seed past 2**63.
    gen = torch.Generator().manual_seed(3)
    indices = [0, 1, 2**32 + 5, *torch.randint(0, 2**31, (60,), generator=gen).tolist()]
    steps = [1, 2**33 + 1, 7, *torch.randint(1, 2**40, (60,), generator=gen).tolist()]
    layouts = [element_layout(torch.empty(n + 1)) for n in range(len(indices))]
    seed = 2**63 + 12345
    streams = streams_for(layouts, seed, steps, indices, moment)
    assert [s.layout for s in streams] == layouts
    assert [(s.key, s.high_key) for s in streams] == [stream_key(seed, s, i, moment) for s, i in zip(steps, indices)]
