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


@pytest.mark.parametrize(("rounding", "status"), [("nearest", Status.WEAK_STATE), ("stochastic", Status.SAFE)])
def test_compensated_bf16_second_moment_is_weak_unless_stochastically_rounded(rounding, status):
    from lightning_precision.optim import CompensatedAdamW

    model = _bf16_model()
    opt = CompensatedAdamW(model.parameters(), exp_avg_sq_dtype=torch.bfloat16, exp_avg_sq_rounding=rounding)
    config = {
        "_target_": "lightning_precision.optim.CompensatedAdamW",
        "exp_avg_sq_dtype": "bf16",
        "exp_avg_sq_rounding": rounding,
    }
    assert check_optimizer(opt).status is status
    assert judge(torch.bfloat16, classify_optimizer(config)).status is status  # config and live optimizer agree


def test_stochastic_second_moment_shows_in_the_state_text():
    config = {
        "_target_": "lightning_precision.optim.CompensatedAdamW",
        "exp_avg_sq_dtype": "bf16",
        "exp_avg_sq_rounding": "stochastic",
    }
    info = classify_optimizer(config)
    assert info.state_text(torch.bfloat16) == "bfloat16 / bfloat16 (stochastic rounding)"
    assert sum(b for _, b in info.state_parts(torch.bfloat16)) == 2 + 2 + 2  # exp_avg, exp_avg_sq, compensation


def test_peft_flag_does_not_excuse_bf16_adapters_under_adamw():
    adamw = classify_optimizer("torch.optim.AdamW")
    verdict = judge(torch.bfloat16, adamw, peft=True)
    assert verdict.status is Status.UNSAFE and "fp32_modules=['*.lora_A.*', '*.lora_B.*']" in verdict.message


def test_peft_with_storage_not_known_yet_waits_for_the_adapters_dtype():
    verdict = judge(None, classify_optimizer("torch.optim.AdamW"), peft=True)
    assert verdict.status is Status.NOT_JUDGED and "adapters are judged by their dtype" in verdict.message


def test_judge_auto_fp32_with_master_is_wasteful():
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


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_fabric_fixes_name_fabric_arguments(precision):
    from lightning_precision.modes import get_mode

    info = classify_optimizer("torch.optim.AdamW")
    verdict = judge(torch.bfloat16, info, precision=get_mode(precision), api="fabric")
    assert "fsdp2_parallelize(" in verdict.fixes[0] and "FSDP2Strategy" not in verdict.message
    assert "model.torch_dtype" not in verdict.message and " before fit" not in verdict.message
    with pytest.raises(ValueError, match=r"judge\(api='lightning'\).*'trainer', 'fabric'"):
        judge(torch.bfloat16, info, api="lightning")


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


ANY_PRECISION = "torchdistx.optimizers.AnyPrecisionAdamW"  # not installed here: classified by path and its signature


@pytest.mark.parametrize(
    ("storage", "kwargs", "status"),
    [
        (torch.float32, {}, Status.WEAK_STATE),  # fp32 parameters, bf16 variance by default
        (torch.float32, {"variance_dtype": "float32"}, Status.SAFE),
        (torch.bfloat16, {"use_kahan_summation": True, "variance_dtype": "float32"}, Status.SAFE),
        (torch.bfloat16, {"use_kahan_summation": True}, Status.WEAK_STATE),
        (torch.bfloat16, {}, Status.UNSAFE),  # no Kahan summation: the bf16 write rounds away
        (torch.float32, {"betas": (0.9, 0.98)}, Status.SAFE),  # a half second moment can decay at beta2 <= 0.99
    ],
)
def test_any_precision_adamw(storage, kwargs, status):
    assert judge(storage, classify_optimizer(ANY_PRECISION, kwargs)).status is status


def test_fp32_storage_with_an_observed_half_second_moment_is_weak_state():
    verdict = judge(torch.float32, classify_optimizer("torch.optim.AdamW"), exp_avg_sq_dtype=torch.bfloat16)
    assert verdict.status is Status.WEAK_STATE and "keeps float32 parameters" in verdict.message


def test_fp32_storage_with_sgd_is_never_weak_state():
    verdict = judge(
        torch.float32, classify_optimizer("torch.optim.SGD", {"momentum": 0.9}), exp_avg_sq_dtype=torch.bfloat16
    )
    assert verdict.status is Status.SAFE


@pytest.mark.parametrize("path", ["bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"])
def test_bitsandbytes_8bit_on_bf16_parameters_is_unsafe(path):
    info = classify_optimizer(path)
    assert judge(torch.bfloat16, info).status is Status.UNSAFE
    assert info.state_dtype("exp_avg", torch.bfloat16) == torch.uint8 == info.state_dtype("exp_avg_sq", torch.bfloat16)


def test_apex_fused_adam_on_bf16_parameters_is_unsafe_although_its_moments_are_fp32():
    info = classify_optimizer("apex.optimizers.FusedAdam", {"master_weights": True})
    verdict = judge(torch.bfloat16, info)
    assert verdict.status is Status.UNSAFE
    assert "writes each update into the bfloat16 parameter in place" in verdict.message
    assert info.state_text(torch.bfloat16) == "float32"


TE_FUSED_ADAM = "transformer_engine.pytorch.optimizers.FusedAdam"


def test_te_fused_adam_with_param_remainders_keeps_a_32_bit_master_in_2_bytes():
    info = classify_optimizer({"_target_": TE_FUSED_ADAM, "master_weights": True, "store_param_remainders": True})
    assert judge(torch.bfloat16, info).status is Status.SAFE
    parts = dict(info.state_parts(torch.bfloat16))
    assert parts == {"exp_avg float32": 4.0, "exp_avg_sq float32": 4.0, "fp32 master remainders (16 low bits)": 2.0}


def test_te_fused_adam_full_master_costs_4_bytes():
    info = classify_optimizer({"_target_": TE_FUSED_ADAM, "master_weights": True})
    assert judge(torch.bfloat16, info).status is Status.SAFE
    assert dict(info.state_parts(torch.bfloat16))["float32 master copy"] == 4.0


def test_te_param_remainders_without_master_weights_is_unsafe_and_says_why():
    info = classify_optimizer({"_target_": TE_FUSED_ADAM, "store_param_remainders": True})
    assert judge(torch.bfloat16, info).status is Status.UNSAFE
    assert "store_param_remainders needs master_weights=True" in info.reason
    assert info.state_text(torch.bfloat16) == "float32"  # its documented moment default, though it writes bf16 params


def test_te_half_master_weight_dtype_does_not_protect_bf16_parameters():
    info = classify_optimizer(
        {"_target_": TE_FUSED_ADAM, "master_weights": True, "store_param_remainders": True,
         "master_weight_dtype": "bfloat16"}
    )  # fmt: skip
    assert judge(torch.bfloat16, info).status is Status.UNSAFE
    assert "master_weight_dtype=bfloat16" in info.reason


@pytest.mark.parametrize("spec", ["my_lab.Novograd", "transformers.optimization.Adafactor"])
def test_fp32_storage_is_safe_with_any_optimizer_even_an_unknown_one(spec):
    verdict = judge(torch.float32, classify_optimizer(spec))
    assert verdict.status is Status.SAFE
    assert "not known" in verdict.message  # says what was not checked


def test_subclass_of_torch_adamw_on_bf16_is_refused_under_error():
    from lightning_precision.errors import PrecisionPairingError
    from lightning_precision.policy import enforce

    class LabAdamW(torch.optim.AdamW):
        pass

    verdict = check_optimizer(LabAdamW(_bf16_model().parameters()))
    assert verdict.status is Status.UNSAFE
    with pytest.raises(PrecisionPairingError, match="subclasses torch.optim.adamw.AdamW"):
        enforce(verdict, "error")
