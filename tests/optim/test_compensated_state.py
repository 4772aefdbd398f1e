import copy
import logging

import pytest
import torch

from lightning_precision.errors import OptimizerStateError, PrecisionConfigError
from lightning_precision.optim import CompensatedAdamW

BF16 = torch.bfloat16


def _train(opt_cls, param, steps=20, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    p = param.detach().clone().requires_grad_()
    opt = opt_cls([p], **kwargs)
    for _ in range(steps):
        p.grad = (torch.randn(p.shape, generator=g) + 1.0).to(p.dtype)
        opt.step()
    return p, opt


def _bf16_run():
    return _train(CompensatedAdamW, torch.randn(64).to(BF16), lr=1e-4, weight_decay=0.0)


def test_bf16_state_into_fp32_optimizer_folds_compensation():
    p, opt = _bf16_run()
    sd = copy.deepcopy(opt.state_dict())
    expected = p.detach().float() + opt.state[p]["compensation"].float()
    assert not torch.equal(expected, p.detach().float())  # the compensation holds bits
    wide = p.detach().float().requires_grad_()  # Lightning's order: weights first
    opt32 = CompensatedAdamW([wide], lr=1e-4, weight_decay=0.0)
    opt32.load_state_dict(sd)
    assert torch.equal(wide.detach(), expected)
    assert "compensation" not in opt32.state[wide]
    assert opt32.state[wide]["exp_avg"].dtype == torch.float32


def test_fold_is_logged_as_exact(caplog):
    p, opt = _bf16_run()
    wide = p.detach().float().requires_grad_()
    opt32 = CompensatedAdamW([wide])
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        opt32.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert "folded" in caplog.text and "exactly" in caplog.text


def test_compensation_not_folded_into_a_parameter_with_more_bits(caplog):
    p, opt = _bf16_run()
    full = (p.detach().float() + torch.randn(64) * 1e-4).requires_grad_()  # not the rounded weight
    before = full.detach().clone()
    opt32 = CompensatedAdamW([full])
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        opt32.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(full.detach(), before)
    assert "compensation" not in opt32.state[full]
    assert "dropped" in caplog.text


def test_bf16_state_into_fp32_optimizer_steps():
    p, opt = _bf16_run()
    wide = p.detach().float().requires_grad_()
    opt32 = CompensatedAdamW([wide])
    opt32.load_state_dict(copy.deepcopy(opt.state_dict()))
    wide.grad = torch.ones(64)
    opt32.step()  # raised KeyError: 'compensation' before
    assert opt32.state[wide]["step"].item() == 21


def test_fp32_state_into_bf16_optimizer_creates_zero_compensation(caplog):
    p, opt = _train(CompensatedAdamW, torch.randn(64), lr=1e-4)
    narrow = p.detach().to(BF16).requires_grad_()
    opt16 = CompensatedAdamW([narrow], lr=1e-4)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        opt16.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = opt16.state[narrow]
    assert state["compensation"].dtype == BF16 and not state["compensation"].any()
    assert state["exp_avg_sq"].dtype == BF16 and state["exp_avg"].dtype == BF16
    assert "were lost when the parameters were narrowed" in caplog.text
    assert "nothing" not in caplog.text.lower()


def test_seed_compensation_stores_rounded_residual():
    p, opt = _train(CompensatedAdamW, torch.randn(64), lr=1e-4)
    narrow = p.detach().to(BF16).requires_grad_()
    opt16 = CompensatedAdamW([narrow], lr=1e-4)
    opt16.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt16.seed_compensation_from({narrow: p.detach()}) == 1
    residual = (p.detach() - narrow.detach().float()).to(BF16)
    assert torch.equal(opt16.state[narrow]["compensation"], residual)
    assert residual.any()


def test_load_with_full_precision_params_creates_the_residual_and_says_what_was_rounded(caplog):
    p, opt = _train(CompensatedAdamW, torch.randn(64), lr=1e-4)
    narrow = p.detach().to(BF16).requires_grad_()
    opt16 = CompensatedAdamW([narrow], lr=1e-4)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        opt16.load_state_dict(copy.deepcopy(opt.state_dict()), full_precision_params={narrow: p.detach()})
    assert torch.equal(opt16.state[narrow]["compensation"], (p.detach() - narrow.detach().float()).to(BF16))
    assert "about 16 of fp32's 24 mantissa bits" in caplog.text and "rounded away" in caplog.text
    assert "starts at zero" not in caplog.text and "nothing" not in caplog.text.lower()


def test_load_with_full_precision_params_refuses_weights_the_parameter_was_not_rounded_from():
    p, opt = _train(CompensatedAdamW, torch.randn(8), lr=1e-4)
    narrow = (p.detach() + 1.0).to(BF16).requires_grad_()
    opt16 = CompensatedAdamW([narrow])
    with pytest.raises(OptimizerStateError, match="parameter 0.*does not hold"):
        opt16.load_state_dict(copy.deepcopy(opt.state_dict()), full_precision_params={narrow: p.detach()})
    assert not opt16.state  # nothing installed


def test_seeded_resume_tracks_fp32_far_better_than_zero_compensation():
    p, opt = _train(CompensatedAdamW, torch.randn(256), steps=10, lr=1e-5, weight_decay=0.0)
    sd = opt.state_dict()
    runs = {}  # None: continue in fp32 (the reference); False: bf16 with zero compensation; True: seeded
    for seeded in (False, True, None):
        q = p.detach().clone() if seeded is None else p.detach().to(BF16)
        q.requires_grad_()
        o = CompensatedAdamW([q], lr=1e-5, weight_decay=0.0)
        o.load_state_dict(copy.deepcopy(sd))
        if seeded:
            o.seed_compensation_from([p.detach()])
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            q.grad = (torch.randn(256, generator=g) + 1.0).to(q.dtype)
            o.step()
        comp = o.state[q].get("compensation")
        runs[seeded] = q.detach().float() + (comp.float() if comp is not None else 0)
    err_zero = (runs[False] - runs[None]).abs().mean()
    err_seed = (runs[True] - runs[None]).abs().mean()
    assert err_seed < err_zero / 20


def test_seed_refuses_weights_the_parameter_was_not_rounded_from():
    narrow = torch.randn(8).to(BF16).requires_grad_()
    opt = CompensatedAdamW([narrow])
    with pytest.raises(OptimizerStateError, match="parameter 0.*does not hold"):
        opt.seed_compensation_from([narrow.detach().float() + 1.0])


def test_torch_adamw_state_converts():
    p, opt = _train(torch.optim.AdamW, torch.randn(32), lr=1e-3)
    q = p.detach().clone().requires_grad_()
    ours = CompensatedAdamW([q], lr=1e-3)
    ours.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[q][key], opt.state[p][key])
    assert "amsgrad" not in ours.param_groups[0] and ours.param_groups[0]["implementation"] == "auto"
    g = torch.randn(32)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ours.step()
    torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_torch_adamw_bf16_state_gets_our_dtypes_and_compensation():
    p, opt = _train(torch.optim.AdamW, torch.randn(32).to(BF16), lr=1e-3)
    q = p.detach().clone().requires_grad_()
    ours = CompensatedAdamW([q], exp_avg_sq_dtype="float32")
    ours.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert ours.state[q]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(ours.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"].float())
    assert not ours.state[q]["compensation"].any()


def test_sgd_state_is_refused_naming_missing_keys():
    p, opt = _train(torch.optim.SGD, torch.randn(4), lr=1e-2, momentum=0.9)
    q = p.detach().clone().requires_grad_()
    ours = CompensatedAdamW([q])
    with pytest.raises(OptimizerStateError, match=r"momentum_buffer.*lacks \['step', 'exp_avg', 'exp_avg_sq'\].*SGD"):
        ours.load_state_dict(opt.state_dict())
    assert len(ours.state) == 0


def test_amsgrad_state_is_refused():
    p, opt = _train(torch.optim.AdamW, torch.randn(4), amsgrad=True)
    ours = CompensatedAdamW([p.detach().clone().requires_grad_()])
    with pytest.raises(OptimizerStateError, match="amsgrad=True"):
        ours.load_state_dict(opt.state_dict())


def _corrupt(key, value_fn):
    p, opt = _bf16_run()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key] = value_fn(sd["state"][0][key])
    q = p.detach().clone().requires_grad_()
    return CompensatedAdamW([q]), sd, q


@pytest.mark.parametrize(
    "key,value_fn,fragment",
    [
        ("exp_avg", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "exp_avg'] of parameter 0"),
        ("compensation", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "compensation'] of parameter 0"),
        ("exp_avg_sq", lambda t: t.index_fill(0, torch.tensor([1]), -1.0), "exp_avg_sq'] of parameter 0"),
        ("exp_avg_sq", lambda t: t[:10], r"exp_avg_sq'\] of parameter 0 \(param group 0\) has shape \(10,\)"),
        ("step", lambda t: t * float("nan"), "step'] of parameter 0"),
    ],
)
def test_corrupt_state_is_refused_naming_the_tensor(key, value_fn, fragment):
    ours, sd, q = _corrupt(key, value_fn)
    with pytest.raises(OptimizerStateError, match=fragment):
        ours.load_state_dict(sd)
    assert len(ours.state) == 0  # nothing was installed


def test_invalid_saved_group_option_is_refused():
    p, opt = _bf16_run()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["eps"] = 0.0
    ours = CompensatedAdamW([p.detach().clone().requires_grad_()])
    with pytest.raises(PrecisionConfigError, match=r"eps \(loaded param group 0\): 0.0"):
        ours.load_state_dict(sd)


def test_parameter_cast_to_bf16_after_steps_gets_a_compensation():
    model = torch.nn.Linear(4, 3)
    opt = CompensatedAdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    model.to(BF16)  # same Parameter objects, now bf16
    model.zero_grad()
    model(torch.randn(2, 4).to(BF16)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert state["compensation"].dtype == BF16
    assert state["exp_avg_sq"].dtype == BF16 and state["exp_avg"].dtype == BF16


def test_parameter_cast_to_fp32_after_steps_folds_the_compensation():
    p, opt = _bf16_run()
    expected = p.detach().float() + opt.state[p]["compensation"].float()
    p.data = p.data.float()
    p.grad = torch.zeros(64)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert "compensation" not in opt.state[p]
    assert torch.equal(p.detach(), expected)


def test_moments_narrowed_on_load_are_said_once_with_their_dtypes(caplog):
    p, opt = _train(CompensatedAdamW, torch.randn(64), lr=1e-4)  # fp32 parameters: fp32 moments
    narrow = p.detach().to(BF16).requires_grad_()
    opt16 = CompensatedAdamW([narrow], lr=1e-4)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        opt16.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(opt16.state[narrow]["exp_avg_sq"], opt.state[p]["exp_avg_sq"].to(BF16))
    said = [r.getMessage() for r in caplog.records if "rounded once, to nearest" in r.getMessage()]
    assert len(said) == 2  # exp_avg and exp_avg_sq, one line each
    assert any("exp_avg_sq of 1 parameter(s)" in m and "float32" in m and "bfloat16" in m for m in said)


def test_saved_fp32_second_moment_layout_is_kept_by_a_default_optimizer(caplog):
    p = torch.nn.Parameter(torch.randn(16).to(BF16))
    opt = CompensatedAdamW([p], exp_avg_sq_dtype="float32")  # the 12 B/param layout
    p.grad = torch.randn(16).to(BF16)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    resumed = CompensatedAdamW([q])  # the default (10 B/param) layout
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    (said,) = [r.getMessage() for r in caplog.records if "keeps the state layout it was saved with" in r.getMessage()]
    assert "exp_avg_sq_dtype='float32'" in said and "exp_avg_sq_rounding='nearest'" in said
    group = resumed.param_groups[0]
    assert (group["exp_avg_sq_dtype"], group["exp_avg_sq_rounding"]) == ("float32", "nearest")
    assert torch.equal(resumed.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_a_state_of_the_same_layout_loads_without_a_layout_line(caplog):
    p = torch.nn.Parameter(torch.randn(16).to(BF16))
    opt = CompensatedAdamW([p])
    p.grad = torch.randn(16).to(BF16)
    opt.step()
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        CompensatedAdamW([torch.nn.Parameter(p.detach().clone())]).load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not [r for r in caplog.records if "state layout" in r.getMessage() or "rounded once" in r.getMessage()]
