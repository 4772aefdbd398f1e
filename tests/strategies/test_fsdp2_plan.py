"""FSDP2's dtype plan: precision and options mapped onto storage and a MixedPrecisionPolicy."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_precision import PrecisionConfigError
from lightning_precision.strategies import resolve_fsdp2_precision
from lightning_precision.strategies.fsdp2_plan import parse_mp_policy

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FLASH_MASTER = {"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 24}


# -- precision -> storage + policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "optimizer", "storage", "was_auto", "param", "reduce", "output"),
    [
        ("bf16-mixed", "torch.optim.AdamW", FP32, True, BF16, FP32, FP32),
        ("bf16-mixed", None, FP32, True, BF16, FP32, FP32),  # unknown optimizer: the safe fp32
        ("bf16-mixed", FLASH_MASTER, BF16, True, BF16, FP32, FP32),  # keeps its own master: half storage
        ("bf16-true", "torch.optim.AdamW", BF16, False, BF16, FP32, FP32),
        ("bf16-flash", FLASH_MASTER, BF16, False, BF16, FP32, FP32),
        ("32-true", "torch.optim.AdamW", FP32, False, None, None, None),
    ],
)
def test_precision_maps_onto_storage_and_policy(precision, optimizer, storage, was_auto, param, reduce, output):
    resolved = resolve_fsdp2_precision(precision, optimizer=optimizer)
    assert resolved.storage_dtype == storage
    assert resolved.storage_was_auto is was_auto
    policy = resolved.mp_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (param, reduce, output)


def test_explicit_storage_dtype_is_honoured():
    resolved = resolve_fsdp2_precision("bf16-mixed", storage_dtype="bf16", optimizer="torch.optim.AdamW")
    assert resolved.storage_dtype == BF16
    assert resolved.storage_was_auto is False


def test_mp_policy_mapping_overrides_the_defaults():
    resolved = resolve_fsdp2_precision("bf16-mixed", mp_policy={"reduce_dtype": "bf16", "cast_forward_inputs": False})
    assert resolved.mp_policy == MixedPrecisionPolicy(BF16, BF16, FP32, cast_forward_inputs=False)
    assert resolved.reduce_dtype == BF16 and resolved.compute_dtype == BF16


def test_peft_leaves_storage_to_the_model():
    assert resolve_fsdp2_precision("bf16-mixed", optimizer="torch.optim.AdamW", peft=True).storage_dtype is None


@pytest.mark.parametrize(
    ("precision", "options", "names"),
    [
        ("bf16-mixed", {"storage_dtype": "fp16"}, ["storage_dtype=float16", "bfloat16"]),
        ("bf16-mixed", {"mp_policy": {"param_dtype": "fp16"}}, ["param_dtype: float16", "bf16-mixed"]),
        ("32-true", {"mp_policy": {"param_dtype": "bf16"}}, ["param_dtype: bfloat16", "32-true", "bf16-mixed"]),
        ("bf16-mixed", {"mp_policy": {"output_dtype": "fp16"}}, ["output_dtype: float16", "bf16-mixed"]),
        ("bf16-true", {"storage_dtype": "fp32"}, ["storage_dtype='fp32'", "bf16-true"]),
        ("32-true", {"storage_dtype": "bf16"}, ["storage_dtype='bf16'", "32-true"]),
    ],
)
def test_conflicting_options_raise_naming_the_values(precision, options, names):
    with pytest.raises(PrecisionConfigError) as err:
        resolve_fsdp2_precision(precision, **options)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"param": "bf16"}, "unknown key"),
        ({"param_dtype": "int8"}, "is not a dtype"),
        ({"cast_forward_inputs": "yes"}, "cast_forward_inputs"),
        ("bf16", "MixedPrecisionPolicy or a mapping"),
    ],
)
def test_invalid_mp_policy_is_refused(value, match):
    with pytest.raises(PrecisionConfigError, match=match):
        parse_mp_policy(value)


def test_mp_policy_instance_is_accepted():
    parsed = parse_mp_policy(MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=FP32))
    assert parsed == {"param_dtype": BF16, "reduce_dtype": FP32, "output_dtype": None, "cast_forward_inputs": True}


@pytest.mark.parametrize(("output", "top", "block"), [(None, FP32, None), ("fp32", FP32, None), ("bf16", BF16, BF16)])
def test_output_dtype_applies_to_what_the_model_hands_on(output, top, block):
    resolved = resolve_fsdp2_precision("bf16-mixed", mp_policy={"output_dtype": output} if output else None)
    assert (resolved.mp_policy.output_dtype, resolved.block_policy.output_dtype) == (top, block)
    assert resolved.block_policy.param_dtype == BF16


def test_output_dtype_in_the_other_half_dtype_is_refused():
    with pytest.raises(PrecisionConfigError, match="output_dtype: float16"):
        resolve_fsdp2_precision("bf16-mixed", mp_policy={"output_dtype": "fp16"})
