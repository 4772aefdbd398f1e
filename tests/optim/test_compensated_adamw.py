import copy
import math
import re
import socket
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_precision.errors import PrecisionConfigError, PrecisionWarning
from lightning_precision.optim import CompensatedAdamW


def _grads(shape, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(steps)]


def _run(opt_cls, param, grads, **kwargs):
    p = param.detach().clone().requires_grad_()
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 1e-2},
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": 1e-3, "weight_decay": 0.0, "maximize": True},
    ],
)
def test_fp32_matches_torch_adamw(kwargs):
    param = torch.randn(31, 17)
    grads = _grads((31, 17), 60, torch.float32)
    ref, ref_opt = _run(torch.optim.AdamW, param, grads, **kwargs)
    # bf16 moment dtypes must not apply to fp32 params: they behave like torch AdamW.
    ours, opt = _run(CompensatedAdamW, param, grads, exp_avg_dtype=torch.bfloat16, **kwargs)
    assert "compensation" not in opt.state[ours]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[ours][key].dtype == torch.float32
        torch.testing.assert_close(opt.state[ours][key], ref_opt.state[ref][key], rtol=1e-5, atol=1e-7)
    assert opt.state[ours]["step"].item() == ref_opt.state[ref]["step"].item() == 60


def test_bf16_small_updates_are_not_lost():
    # lr small against the bf16 ulp of O(1) weights: torch AdamW rounds most writes away.
    param = torch.randn(4096).to(torch.bfloat16)
    # A consistent gradient sign makes every Adam update about lr in size.
    grads = [(g + 2.0).to(torch.bfloat16) for g in _grads(4096, 100, torch.float32)]
    kwargs = {"lr": 1e-4, "weight_decay": 0.0}
    torch_p, _ = _run(torch.optim.AdamW, param, grads, **kwargs)
    ours, opt = _run(CompensatedAdamW, param, grads, **kwargs)
    fp32_p, _ = _run(torch.optim.AdamW, param.float(), [g.float() for g in grads], **kwargs)

    stale_torch = (torch_p == param).float().mean().item()
    stale_ours = (ours == param).float().mean().item()
    assert stale_torch > 0.5
    # Elements whose fp32 trajectory barely moves may round back to the same bf16 value.
    stale_fp32 = (fp32_p.to(torch.bfloat16) == param).float().mean().item()
    assert stale_ours <= stale_fp32 + 0.02
    assert stale_ours < stale_torch - 0.3

    # p + compensation tracks the fp32 trajectory far better than the bf16 ulp. It is not exact:
    # the bf16 compensation is itself rounded at every write (about 16 mantissa bits in total).
    effective = ours.float() + opt.state[ours]["compensation"].float()
    err_ours = (effective - fp32_p).abs()
    err_torch = (torch_p.float() - fp32_p).abs()
    moved = (fp32_p - param.float()).abs().mean().item()
    assert err_ours.max().item() < err_torch.max().item() / 10
    assert err_ours.mean().item() < 0.01 * moved
    assert err_torch.mean().item() > 0.3 * moved


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m_dtype,v_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_state_dtypes(param_dtype, m_dtype, v_dtype):
    p = torch.randn(8, 3).to(param_dtype).requires_grad_()
    opt = CompensatedAdamW([p], exp_avg_dtype=m_dtype, exp_avg_sq_dtype=v_dtype)
    expected = {"exp_avg": m_dtype, "exp_avg_sq": v_dtype, "compensation": param_dtype}
    assert opt.state_dtypes(p) == expected
    p.grad = torch.randn(8, 3).to(param_dtype)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "compensation"}
    assert {k: state[k].dtype for k in expected} == expected
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    assert all(torch.isfinite(state[k]).all() for k in expected)


def test_default_dtypes_and_contract():
    p = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    q = torch.zeros(2, requires_grad=True)
    opt = CompensatedAdamW([p, q])
    assert opt.state_dtypes(p) == {
        "exp_avg": torch.bfloat16,
        "exp_avg_sq": torch.bfloat16,
        "compensation": torch.bfloat16,
    }
    assert opt.param_groups[0]["exp_avg_sq_rounding"] == "stochastic"
    assert opt.state_dtypes(q) == {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    assert CompensatedAdamW.keeps_master_weights is False
    assert CompensatedAdamW.compensated_update is True
    with pytest.raises(ValueError):
        opt.state_dtypes(torch.zeros(2))


def test_string_state_dtypes():
    p = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    opt = CompensatedAdamW([p], exp_avg_dtype="fp32", exp_avg_sq_dtype="bfloat16")
    assert opt.state_dtypes(p)["exp_avg"] == torch.float32
    assert opt.state_dtypes(p)["exp_avg_sq"] == torch.bfloat16


def _trained_mixed(steps=5):
    torch.manual_seed(0)
    half = torch.randn(6, 5).to(torch.bfloat16).requires_grad_()
    full = torch.randn(7).requires_grad_()
    # An fp32 second moment of bf16 parameters: torch's default load would cast it to bf16.
    opt = CompensatedAdamW([{"params": [half]}, {"params": [full], "lr": 1e-2}], lr=1e-3, exp_avg_sq_dtype="float32")
    for _ in range(steps):
        half.grad = torch.randn(6, 5).to(torch.bfloat16)
        full.grad = torch.randn(7)
        opt.step()
    return half, full, opt


def test_state_dict_round_trip_keeps_values_and_dtypes():
    half, full, opt = _trained_mixed()
    sd = copy.deepcopy(opt.state_dict())

    half2 = half.detach().clone().requires_grad_()
    full2 = full.detach().clone().requires_grad_()
    opt2 = CompensatedAdamW([{"params": [half2]}, {"params": [full2]}], lr=5.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == 1e-2
    for p, p2 in ((half, half2), (full, full2)):
        s, s2 = opt.state[p], opt2.state[p2]
        assert set(s) == set(s2)
        for key in s:
            assert s2[key].dtype == s[key].dtype, key
            assert torch.equal(s2[key], s[key]), key
    assert opt2.state[half2]["exp_avg_sq"].dtype == torch.float32
    # The loaded state is a copy: stepping must not write into the source state dict.
    saved = copy.deepcopy(sd)
    for p, p2 in ((half, half2), (full, full2)):
        g = torch.randn_like(p)
        p.grad, p2.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    for k in sd["state"]:
        for key in sd["state"][k]:
            assert torch.equal(sd["state"][k][key], saved["state"][k][key])
    assert torch.equal(half, half2) and torch.equal(full, full2)
    assert opt2.state_dict()["state"][0]["exp_avg_sq"].dtype == torch.float32


def test_load_state_dict_runs_user_hooks_on_full_state():
    half, _, opt = _trained_mixed()
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(set(sd["state"][0])))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert seen == [{"step", "exp_avg", "exp_avg_sq", "compensation"}]
    assert opt.state[half]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"lr": -1e-3}, "-0.001"),
        ({"eps": -1.0}, "-1.0"),
        ({"betas": (1.0, 0.999)}, "1.0"),
        ({"betas": (0.9, -0.5)}, "-0.5"),
        ({"weight_decay": -0.25}, "-0.25"),
        ({"exp_avg_dtype": torch.int8}, "torch.int8"),
        ({"exp_avg_sq_dtype": "fp8"}, "fp8"),
    ],
)
def test_invalid_hyperparameters(kwargs, fragment):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        CompensatedAdamW([p], **kwargs)


def test_sparse_grad_raises():
    p = torch.zeros(3, requires_grad=True)
    opt = CompensatedAdamW([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dtensor_parameter_matches_plain_tensor():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.randn(16, 4).to(torch.bfloat16)
        grads = _grads((16, 4), 5, torch.bfloat16)
        plain, plain_opt = _run(CompensatedAdamW, param, grads, lr=1e-3)

        dp = torch.nn.Parameter(distribute_tensor(param.clone(), mesh, [Shard(0)]))
        opt = CompensatedAdamW([dp], lr=1e-3)
        for g in grads:
            dp.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        state = opt.state[dp]
        for key in ("exp_avg", "exp_avg_sq", "compensation"):
            assert isinstance(state[key], DTensor), key
            assert torch.equal(state[key].full_tensor(), plain_opt.state[plain][key]), key
        assert torch.equal(dp.detach().full_tensor(), plain.detach())
    finally:
        dist.destroy_process_group()


# Every invalid hyperparameter, with the text its message must name.
_INVALID = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, True, False, "0.1", None]).map(lambda v: ("lr", v)),
    st.floats(max_value=-1e-300, allow_nan=False).map(lambda v: ("lr", v)),
    st.sampled_from([0.0, -1e-8, math.nan, math.inf, True]).map(lambda v: ("eps", v)),
    st.floats(max_value=-1e-300, allow_nan=False).map(lambda v: ("weight_decay", v)),
    st.sampled_from([math.nan, math.inf, True]).map(lambda v: ("weight_decay", v)),
    st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-300), st.just(math.nan)).map(
        lambda b: ("betas", (0.9, b))
    ),
    st.sampled_from(["false", "true", 0, 1, None]).map(lambda v: ("maximize", v)),
)


def _named(key, value):
    shown = value[1] if key == "betas" else value
    return re.escape(f"{key if key != 'betas' else 'beta parameter at index 1'}") + r".*" + re.escape(repr(shown))


@settings(max_examples=60, deadline=None)
@given(_INVALID)
def test_constructor_refuses_invalid_value(case):
    key, value = case
    with pytest.raises(PrecisionConfigError, match=_named(key, value)):
        CompensatedAdamW([torch.zeros(2, requires_grad=True)], **{key: value})


@settings(max_examples=60, deadline=None)
@given(_INVALID)
def test_add_param_group_refuses_invalid_value(case):
    key, value = case
    opt = CompensatedAdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(PrecisionConfigError, match=_named(key, value)) as excinfo:
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], key: value})
    assert "(param group 1)" in str(excinfo.value)
    assert len(opt.param_groups) == 1


@settings(max_examples=30, deadline=None)
@given(_INVALID)
def test_group_dict_in_constructor_refuses_invalid_value(case):
    key, value = case
    with pytest.raises(PrecisionConfigError, match=_named(key, value)):
        CompensatedAdamW([{"params": [torch.zeros(2, requires_grad=True)], key: value}])


def test_maximize_string_false_does_not_ascend():
    with pytest.raises(PrecisionConfigError, match="maximize.*'false'.*True or False"):
        CompensatedAdamW([torch.zeros(2, requires_grad=True)], maximize="false")


@pytest.mark.parametrize("implementation", ["chunked", "reference", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nonfinite_gradient_leaves_tensor_state_unchanged(implementation, dtype):
    bad, good = torch.randn(5).to(dtype).requires_grad_(), torch.randn(4).to(dtype).requires_grad_()
    opt = CompensatedAdamW([bad, good], lr=1e-2, implementation=implementation)
    bad.grad, good.grad = torch.randn(5).to(dtype), torch.randn(4).to(dtype)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[bad].items() if k != "step"}
    param_before, good_before = bad.detach().clone(), good.detach().clone()
    bad.grad = torch.tensor([1.0, float("nan"), 0.0, float("inf"), 2.0]).to(dtype)
    good.grad = torch.randn(4).to(dtype)
    with pytest.warns(PrecisionWarning, match="step 2.*nan or inf.*parameter 0"):
        opt.step()
    assert torch.equal(bad.detach(), param_before)
    for key, value in before.items():
        assert torch.equal(opt.state[bad][key], value), key
    assert not torch.equal(good.detach(), good_before)


def test_huge_finite_gradient_is_stepped_not_skipped():
    # The sum of its squares overflows fp32 (the CPU check's fast 2-norm is inf), but every element is finite.
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = CompensatedAdamW([p], lr=1e-2)
    p.grad = torch.full((4,), 1e19, dtype=torch.bfloat16)  # each square 1e38 is finite; their sum is not
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        opt.step()
    assert torch.all(p.detach() < 0)


def test_nonfinite_gradient_still_advances_step_count():
    p = torch.randn(3).requires_grad_()
    opt = CompensatedAdamW([p])
    p.grad = torch.full((3,), float("nan"))
    with pytest.warns(PrecisionWarning):
        opt.step()
    assert opt.state[p]["step"].item() == 1.0


def test_nonfinite_warning_is_given_once():
    p = torch.randn(3).requires_grad_()
    opt = CompensatedAdamW([p])
    with pytest.warns(PrecisionWarning) as record:
        for _ in range(3):
            p.grad = torch.full((3,), float("inf"))
            opt.step()
    assert len([w for w in record if issubclass(w.category, PrecisionWarning)]) == 1


def test_found_inf_skips_every_tensor():
    p, q = torch.randn(6).to(torch.bfloat16).requires_grad_(), torch.randn(3).requires_grad_()
    opt = CompensatedAdamW([p, q], lr=1e-2)
    before = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.randn(6).to(torch.bfloat16), torch.randn(3)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(q.detach(), before[1])
    assert not opt.state[p]["exp_avg_sq"].any()


def test_grad_scale_unscales_gradients():
    param = torch.randn(6).to(torch.bfloat16)
    grads = _grads(6, 3, torch.bfloat16)
    # eps of the order of the gradient: a step on still-scaled gradients would differ.
    ref, _ = _run(CompensatedAdamW, param, grads, lr=1e-2, eps=0.5)
    p = param.clone().requires_grad_()
    opt = CompensatedAdamW([p], lr=1e-2, eps=0.5)
    for g in grads:
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        p.grad = g * 1024  # a power of two: unscaling is exact
        opt.step()
    assert torch.equal(p.detach(), ref.detach())


def test_grad_scaler_drives_the_optimizer_without_unscale_step():
    p = torch.randn(4, requires_grad=True)
    opt = CompensatedAdamW([p], lr=1e-1)
    opt._step_supports_amp_scaling = True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = p.detach().clone()
    scaler.scale((p * torch.tensor([1.0, 2.0, 3.0, float("inf")])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), before)
    assert scaler.get_scale() < 2.0**10
