"""The pairing rule: classification, storage resolution, judgement and enforcement."""

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError, PrecisionWarning
from lightning_precision.pairing import (
    OptimizerKind,
    Status,
    check_optimizer,
    classify_optimizer,
    enforce,
    judge,
    resolve_storage_dtype,
)

FOLLOWS, MASTER, COMP, UNKNOWN = (
    OptimizerKind.STATE_FOLLOWS_PARAM,
    OptimizerKind.KEEPS_MASTER,
    OptimizerKind.COMPENSATED,
    OptimizerKind.UNKNOWN,
)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("torch.optim.AdamW", FOLLOWS),
        ("torch.optim.adamw.AdamW", FOLLOWS),
        (torch.optim.SGD, FOLLOWS),
        ({"_target_": "torch.optim.Adam", "lr": 1e-3}, FOLLOWS),
        ({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, FOLLOWS),
        ({"_target_": "flashoptim.FlashAdamW"}, MASTER),  # master_weight_bits defaults to 24
        ({"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 32}, MASTER),
        ({"_target_": "flashoptim.FlashAdamW", "master_weight_bits": None}, FOLLOWS),
        ({"_target_": "optimi.AdamW", "lr": 1e-3}, COMP),  # kahan_sum=None: automatic for half params
        ({"_target_": "optimi.AdamW", "kahan_sum": False}, FOLLOWS),
        ({"_target_": "transformer_engine.pytorch.optimizers.FusedAdam", "master_weights": True}, MASTER),
        ({"_target_": "transformer_engine.pytorch.optimizers.FusedAdam"}, FOLLOWS),
        ({"_target_": "torchao.optim._AdamW", "bf16_stochastic_round": True}, COMP),
        ("my_lab.optim.Shampoo", UNKNOWN),
    ],
)
def test_classify_config_and_paths(spec, kind):
    assert classify_optimizer(spec).kind is kind


def test_classify_same_class_under_two_paths_agrees():
    assert classify_optimizer("torch.optim.AdamW") == classify_optimizer("torch.optim.adamw.AdamW")


def test_classify_omegaconf_node():
    assert classify_optimizer(OmegaConf.create({"_target_": "torch.optim.AdamW"})).kind is FOLLOWS


def test_classify_instance_reads_what_it_keeps():
    flashoptim = pytest.importorskip("flashoptim")
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = flashoptim.FlashAdamW([p], quantize=False, master_weight_bits=None, fused=False)
    assert classify_optimizer(opt).kind is FOLLOWS
    assert classify_optimizer(torch.optim.AdamW([p])).beta2 == 0.999


class DeclaresMaster(torch.optim.SGD):
    keeps_master_weights = True


class DeclaresCompensation(torch.optim.SGD):
    compensated_update = True


@pytest.mark.parametrize(("cls", "kind"), [(DeclaresMaster, MASTER), (DeclaresCompensation, COMP)])
def test_optimizer_can_declare_itself(cls, kind):
    assert classify_optimizer(cls).kind is kind
    assert classify_optimizer(cls([torch.nn.Parameter(torch.zeros(1))], lr=0.1)).kind is kind


@pytest.mark.parametrize("bad", [42, {"lr": 1e-3}])
def test_classify_rejects_what_is_not_an_optimizer(bad):
    with pytest.raises(PrecisionConfigError):
        classify_optimizer(bad)


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


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "bf16-true"), ("bf16", "fp16-flash")])
def test_resolve_storage_dtype_conflict_is_an_error(dtype, precision):
    with pytest.raises(PrecisionConfigError, match=precision):
        resolve_storage_dtype({"torch_dtype": dtype}, ADAMW, precision=precision)


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


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, PrecisionWarning)]


def test_enforce_warns_once_per_cause():
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    assert len(_record(lambda: [enforce(unsafe) for _ in range(3)])) == 1
    other = judge(torch.float16, classify_optimizer("torch.optim.SGD"))
    assert len(_record(lambda: enforce(other))) == 1  # a different cause warns on its own


def test_enforce_error_and_ignore():
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    with pytest.raises(PrecisionPairingError, match="on_unsafe='error'"):
        enforce(unsafe, "error")
    assert _record(lambda: enforce(unsafe, "ignore")) == []


def test_enforce_warns_only_on_rank_zero(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    assert _record(lambda: enforce(unsafe)) == []
    with pytest.raises(PrecisionPairingError):  # but every rank refuses
        enforce(unsafe, "error")


@pytest.mark.parametrize("bad", ["warning", "raise", None, True])
def test_enforce_rejects_unknown_policy(bad):
    with pytest.raises(PrecisionConfigError, match="warn, error, ignore"):
        enforce(judge(torch.float32, classify_optimizer("torch.optim.AdamW")), bad)
