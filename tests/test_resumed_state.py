"""What a resume decides about a loaded optimizer state, on plain tensors (the same functions run on DTensor shards
under FSDP2 in ``tests/strategies/test_fsdp2_resume_distributed.py``, and for the single-process Trainer in
``tests/callbacks/test_guard_resume.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_precision import resumed_state
from lightning_precision.errors import OptimizerStateError
from lightning_precision.strategies import fsdp2_resume
from tests.helpers import adamw_state

PATH = Path("ckpt")


def test_clean_state_passes_the_check():
    resumed_state.check_loaded_state(adamw_state(nn.Linear(3, 2)), "AdamW", PATH, torch.device("cpu"))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("exp_avg", float("inf"), r"state\['exp_avg'\] of weight holds nan/inf"),
        ("exp_avg_sq", -1.0, r"state\['exp_avg_sq'\] of weight holds negative"),
        ("step", -2.0, r"state\['step'\] of weight holds negative"),
    ],
)
def test_corrupt_state_is_refused_naming_the_tensor(key, value, fragment):
    state = adamw_state(nn.Linear(3, 2))
    state["weight"][key] = torch.full_like(state["weight"][key], value)
    with pytest.raises(OptimizerStateError, match=fragment):
        resumed_state.check_loaded_state(state, "AdamW", PATH, torch.device("cpu"))


def test_torch_adamw_refuses_a_state_without_its_moments_naming_both_optimizers():
    model = nn.Linear(3, 2)
    state = {name: {"momentum_buffer": torch.zeros_like(p)} for name, p in model.named_parameters()}
    with pytest.raises(OptimizerStateError, match=r"AdamW cannot resume .* saved by torch.optim.SGD.*lacks"):
        resumed_state.require_moments(torch.optim.AdamW(model.parameters()), state, "AdamW", "torch.optim.SGD")


def _compensated_osd(model: nn.Module) -> dict:
    state = adamw_state(model)
    for name, p in model.named_parameters():
        state[name]["compensation"] = torch.full_like(p, 2.0**-12, dtype=torch.bfloat16)
    groups = [{"params": [n for n, _ in model.named_parameters()], "lr": 1e-3, "exp_avg_dtype": "bfloat16"}]
    return {"state": state, "param_groups": groups}


def test_compensation_resumed_by_torch_adamw_in_fp32_is_folded_and_its_options_dropped(caplog):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # the rounded weight the compensation belongs to
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters())
    params = dict(model.named_parameters())
    osd = _compensated_osd(model)
    by_index = fsdp2_resume._keyed_by_index(optimizer, osd, params, "AdamW")
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        resumed_state.fold_saved_compensation(optimizer, by_index, osd["state"], params, "AdamW", "CompensatedAdamW")
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name] + 2.0**-12)
        assert "compensation" not in osd["state"][name]
    assert "exp_avg_dtype" not in by_index["param_groups"][0]
    assert "folded the saved compensation" in caplog.text


def test_compensation_resumed_by_torch_adamw_in_bf16_is_refused_naming_both_and_the_fix():
    model = nn.Linear(3, 2).bfloat16()
    optimizer = torch.optim.AdamW(model.parameters())
    params = dict(model.named_parameters())
    osd = _compensated_osd(model)
    by_index = fsdp2_resume._keyed_by_index(optimizer, osd, params, "AdamW")
    with pytest.raises(OptimizerStateError, match=r"AdamW cannot resume the state saved by CompensatedAdamW.*float32"):
        resumed_state.fold_saved_compensation(optimizer, by_index, osd["state"], params, "AdamW", "CompensatedAdamW")
