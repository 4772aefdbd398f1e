"""The pairing rule: judging a storage dtype against what an optimizer keeps."""

import pytest
import torch

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.pairing import Status, check_optimizer, judge

ADAMW = {"_target_": "torch.optim.AdamW"}
FLASH = {"_target_": "flashoptim.FlashAdamW"}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_judge_half_storage_with_in_place_optimizer_is_unsafe(half):
    verdict = judge(half, classify_optimizer("torch.optim.AdamW"), num_params=3, num_elements=300)
    assert verdict.status is Status.UNSAFE
    assert "3 trainable" in verdict.message and "AdamW" in verdict.message and len(verdict.fixes) == 2


@pytest.mark.parametrize(
    ("storage", "spec", "status"),
    [
        (torch.float32, "torch.optim.AdamW", Status.SAFE),
        (torch.bfloat16, FLASH, Status.SAFE),
        (torch.bfloat16, {"_target_": "optimi.AdamW", "betas": (0.9, 0.99)}, Status.SAFE),
        (torch.bfloat16, {"_target_": "optimi.AdamW", "betas": (0.9, 0.999)}, Status.WEAK_STATE),
        (torch.bfloat16, "my_lab.Unknown", Status.UNKNOWN),
    ],
)
def test_judge_other_pairings(storage, spec, status):
    assert judge(storage, classify_optimizer(spec)).status is status


def test_judge_peft_and_auto_fp32_with_master():
    adamw = classify_optimizer("torch.optim.AdamW")
    assert judge(torch.bfloat16, adamw, peft=True).status is Status.NOT_JUDGED
    assert judge(torch.float32, classify_optimizer(FLASH), storage_was_auto=True).status is Status.WASTEFUL


def _bf16_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)


def test_check_optimizer_counts_trainable_half_params_only():
    model = _bf16_model()
    model[0].requires_grad_(False)
    verdict = check_optimizer(torch.optim.AdamW(model.parameters()))
    assert verdict.status is Status.UNSAFE
    assert (verdict.num_params, verdict.num_elements) == (2, 10)


def test_check_optimizer_frozen_half_params_are_not_flagged():
    model = torch.nn.Linear(4, 4)
    frozen = torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    opt = torch.optim.AdamW([*model.parameters(), *frozen.parameters()])
    assert check_optimizer(opt).status is Status.SAFE


def test_fix_under_mixed_precision_is_loading_in_fp32_not_choosing_mixed():
    from lightning_precision.modes import get_mode

    verdict = judge(torch.bfloat16, classify_optimizer("torch.optim.AdamW"), precision=get_mode("bf16-mixed"))
    assert "precision='bf16-mixed', or" not in verdict.fixes[0]
    assert "load the model in fp32" in verdict.fixes[0]
    plain = judge(torch.bfloat16, classify_optimizer("torch.optim.AdamW"), precision=get_mode("bf16-true"))
    assert "precision='bf16-mixed'" in plain.fixes[0]


@pytest.mark.parametrize(
    ("path", "kwargs", "named", "not_named"),
    [
        ("torch.optim.SGD", {"momentum": 0.9}, "momentum_buffer", "exp_avg_sq"),
        ("torch.optim.SGD", {}, "small updates", "exp_avg"),
        ("torch.optim.AdamW", {}, "exp_avg, exp_avg_sq", "momentum"),
    ],
)
def test_unsafe_message_names_the_state_the_optimizer_keeps(path, kwargs, named, not_named):
    verdict = judge(torch.bfloat16, classify_optimizer(path, kwargs))
    assert named in verdict.message and not_named not in verdict.message
