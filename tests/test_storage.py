"""The storage decision: explicit dtype, precision, PEFT, then the rule."""

import pytest
import torch
from omegaconf import OmegaConf

from lightning_precision.errors import PrecisionConfigError
from lightning_precision.storage import decide_storage, resolve_storage_dtype

ADAMW = {"_target_": "torch.optim.AdamW"}
FLASH = {"_target_": "flashoptim.FlashAdamW"}


@pytest.mark.parametrize(
    ("model_cfg", "opt", "peft", "precision", "expected"),
    [
        ({}, ADAMW, False, None, torch.float32),
        ({"torch_dtype": "auto"}, ADAMW, False, "bf16-mixed", torch.float32),
        (None, "my_lab.Unknown", False, None, torch.float32),  # unknown: the safe choice
        (None, None, False, None, torch.float32),
        ({"torch_dtype": "auto"}, FLASH, False, None, torch.bfloat16),
        ({}, FLASH, False, "fp16-flash", torch.float16),
        ({}, FLASH, False, "16-mixed", torch.float16),
        ({"torch_dtype": "bf16"}, ADAMW, False, None, torch.bfloat16),  # explicit is honoured
        ({"torch_dtype": "torch.float32"}, FLASH, False, None, torch.float32),
        ({}, ADAMW, False, "bf16-true", torch.bfloat16),  # the precision casts the module
        ({}, ADAMW, True, None, None),  # PEFT is left alone
    ],
)
def test_resolve_storage_dtype(model_cfg, opt, peft, precision, expected):
    assert resolve_storage_dtype(model_cfg, opt, peft=peft, precision=precision) == expected


def test_resolve_storage_dtype_struct_mode_and_no_mutation():
    cfg = OmegaConf.create({"name": "m"})
    OmegaConf.set_struct(cfg, True)
    assert resolve_storage_dtype(cfg, ADAMW) == torch.float32
    assert "torch_dtype" not in cfg


def test_resolve_storage_dtype_reads_only_the_dtype_of_a_nemo_model_section():
    model = OmegaConf.create({"train_ds": {"manifest_filepath": "???"}, "d": "${sum:1,2}", "torch_dtype": "bf16"})
    assert resolve_storage_dtype(model, ADAMW) == torch.bfloat16
    model.torch_dtype = "???"
    with pytest.raises(PrecisionConfigError, match=r"model\.torch_dtype is '\?\?\?'"):  # not read as unset
        resolve_storage_dtype(model, ADAMW)


@pytest.mark.parametrize("keyword", ["is_peft", "context", "logger"])
def test_resolve_storage_dtype_refuses_automodels_call_shape_and_leaves_the_config_alone(keyword):
    cfg = {"torch_dtype": "auto"}
    with pytest.raises(TypeError, match=rf"{keyword}=.*NeMo AutoModel's call.*sets cfg_model\.torch_dtype in place"):
        resolve_storage_dtype(cfg, ADAMW, **{keyword: False if keyword == "is_peft" else None})
    assert cfg == {"torch_dtype": "auto"}  # nothing set, nothing returned: the caller learns at once


def test_resolve_storage_dtype_names_any_other_unknown_keyword_and_its_arguments():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) pef=True; it takes .*peft, precision"):
        resolve_storage_dtype({}, ADAMW, pef=True)


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "bf16-true"), ("bf16", "fp16-flash")])
def test_resolve_storage_dtype_conflict_is_an_error(dtype, precision):
    with pytest.raises(PrecisionConfigError, match=precision):
        resolve_storage_dtype({"torch_dtype": dtype}, ADAMW, precision=precision)


@pytest.mark.parametrize(
    ("options", "dtype", "was_auto", "why"),
    [
        ({"precision": "bf16-mixed", "optimizer": "torch.optim.AdamW"}, torch.float32, True, "AdamW keeps its state"),
        ({"precision": "bf16-mixed", "optimizer": FLASH | {"master_weight_bits": 24}}, torch.bfloat16, True, "master"),
        ({"precision": "bf16-mixed", "explicit": "bf16"}, torch.bfloat16, False, "explicit model.torch_dtype"),
        ({"precision": "bf16-true", "optimizer": "torch.optim.AdamW"}, torch.bfloat16, False, "'bf16-true' casts"),
        ({"precision": "bf16-mixed", "peft": True}, None, True, "PEFT"),
        ({}, torch.float32, True, "optimizer not known"),
    ],
)
def test_decision_says_what_why_and_whether_auto(options, dtype, was_auto, why):
    decision = decide_storage(**options)
    assert (decision.dtype, decision.was_auto) == (dtype, was_auto)
    assert why in decision.reason


def test_config_and_strategy_carry_the_same_decision():
    from lightning_precision import FSDP2Strategy, resolve_trainer_cfg

    optimizer = {"_target_": "torch.optim.AdamW"}
    plain = resolve_trainer_cfg({"precision": "bf16-mixed"}, model={}, optimizer=optimizer)
    sharded = resolve_trainer_cfg({"precision": "bf16-mixed", "strategy": FSDP2Strategy()}, optimizer=optimizer)
    expected = decide_storage(precision="bf16-mixed", optimizer=optimizer)
    assert plain.storage == sharded.storage == sharded.sharded.storage == expected
