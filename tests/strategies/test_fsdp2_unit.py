"""FSDP2Strategy's pure parts, in one process without a process group."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_precision import FSDP2Strategy, PrecisionConfigError, PrecisionWarning, Status, resolve_trainer_cfg
from lightning_precision.strategies import resolve_fsdp2_precision, select_blocks
from lightning_precision.strategies.fsdp2 import CHECKPOINT_KEY, parse_mp_policy
from lightning_precision.strategies.parallelize import top_level_units

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FLASH_MASTER = {"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 24}


# -- precision -> storage + policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "optimizer", "storage", "was_auto", "param", "reduce", "output"),
    [
        ("bf16-mixed", "torch.optim.AdamW", FP32, True, BF16, FP32, BF16),
        ("bf16-mixed", None, FP32, True, BF16, FP32, BF16),  # unknown optimizer: the safe fp32
        ("bf16-mixed", FLASH_MASTER, BF16, True, BF16, FP32, BF16),  # keeps its own master: half storage
        ("bf16-true", "torch.optim.AdamW", BF16, False, BF16, FP32, BF16),
        ("bf16-flash", FLASH_MASTER, BF16, False, BF16, FP32, BF16),
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
    assert resolved.mp_policy == MixedPrecisionPolicy(BF16, BF16, BF16, cast_forward_inputs=False)
    assert resolved.reduce_dtype == BF16 and resolved.compute_dtype == BF16


def test_peft_leaves_storage_to_the_model():
    assert resolve_fsdp2_precision("bf16-mixed", optimizer="torch.optim.AdamW", peft=True).storage_dtype is None


@pytest.mark.parametrize(
    ("precision", "options", "names"),
    [
        ("bf16-mixed", {"storage_dtype": "fp16"}, ["storage_dtype=float16", "bfloat16"]),
        ("bf16-mixed", {"mp_policy": {"param_dtype": "fp16"}}, ["param_dtype: float16", "bf16-mixed"]),
        ("32-true", {"mp_policy": {"param_dtype": "bf16"}}, ["param_dtype: bfloat16", "32-true", "bf16-mixed"]),
        ("bf16-mixed", {"mp_policy": {"output_dtype": "fp32"}}, ["output_dtype: float32", "bf16-mixed"]),
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


# -- constructor validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_unsafe": "loud"}, "on_unsafe='loud'"),
        ({"storage_dtype": "int8"}, "storage_dtype"),
        ({"blocks": 3}, "blocks=3"),
        ({"optimizer": 42}, "Cannot classify optimizer 42"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size=0"),
    ],
)
def test_invalid_constructor_arguments_raise(kwargs, match):
    with pytest.raises(PrecisionConfigError, match=match):
        FSDP2Strategy(**kwargs)


# -- registry and configs ---------------------------------------------------------------------------------------------


def test_registered_as_fsdp2():
    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy


def test_trainer_accepts_the_registered_name():
    trainer = pl.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)


@pytest.mark.parametrize(
    "strategy_cfg",
    [
        "fsdp2",
        {"name": "fsdp2", "storage_dtype": "auto", "mp_policy": {"reduce_dtype": "fp32"}},
        {"_target_": "lightning_precision.FSDP2Strategy", "mp_policy": {"reduce_dtype": "fp32"}},
    ],
    ids=["name", "mapping", "target"],
)
def test_resolve_trainer_cfg_builds_it_and_passes_the_optimizer(strategy_cfg):
    kwargs = resolve_trainer_cfg(
        {"strategy": strategy_cfg, "precision": "bf16-mixed", "lightning_precision": {"on_unsafe": "error"}},
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3},
    )
    strategy = kwargs["strategy"]
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.optimizer_hint == {"_target_": "torch.optim.AdamW", "lr": 1e-3}
    assert strategy.on_unsafe == "error"


def test_strategy_options_win_over_the_config():
    strategy = FSDP2Strategy(optimizer="torch.optim.SGD", on_unsafe="ignore")
    resolve_trainer_cfg(
        {"strategy": strategy, "lightning_precision": {"on_unsafe": "error"}}, optimizer="torch.optim.AdamW"
    )
    assert (strategy.optimizer_hint, strategy.on_unsafe) == ("torch.optim.SGD", "ignore")


@pytest.mark.parametrize(("strategy_storage", "expected"), [("auto", torch.bfloat16), ("fp32", "fp32")])
def test_model_torch_dtype_reaches_an_auto_strategy(strategy_storage, expected):
    strategy = FSDP2Strategy(storage_dtype=strategy_storage)
    resolve_trainer_cfg(
        {"strategy": strategy, "precision": "bf16-mixed", "lightning_precision": {"on_unsafe": "ignore"}},
        model={"torch_dtype": "bf16"},
        optimizer={"_target_": "flashoptim.FlashAdamW"},
    )
    assert strategy.storage_dtype_option == expected  # the strategy's own explicit option wins


# -- block selection --------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.extra = nn.ModuleDict({"head": nn.Linear(4, 1)})
        self.act = nn.ReLU()


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        (None, ["layers.1", "layers.0"]),
        ("Block", ["layers.1", "layers.0"]),
        (["Linear"], ["extra.head", "layers.1.fc", "layers.0.fc", "embed"]),
        (lambda name, module: name == "embed", ["embed"]),
    ],
    ids=["default-modulelist-children", "class-name", "class-names", "callable"],
)
def test_select_blocks(blocks, expected):
    assert [name for name, _ in select_blocks(Net(), blocks)] == expected


def test_top_level_units_look_through_containers_and_skip_parameterless_modules():
    assert [name for name, _ in top_level_units(Net())] == ["embed", "layers.0", "layers.1", "extra.head"]


# -- runtime pairing check and resume reporting (no process group needed) ---------------------------------------------


class MasterKeepingAdamW(torch.optim.AdamW):
    keeps_master_weights = True


def _setup_like(strategy: FSDP2Strategy, precision: str, **options) -> FSDP2Strategy:
    strategy.resolved = resolve_fsdp2_precision(precision, **options)
    return strategy


def test_auto_fp32_with_a_master_keeping_optimizer_is_reported_wasteful(caplog):
    strategy = _setup_like(FSDP2Strategy(), "bf16-mixed")  # optimizer unknown before it exists: fp32
    optimizer = MasterKeepingAdamW(nn.Linear(2, 2).parameters())
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        (verdict,) = strategy.check_pairing([optimizer])
    assert verdict.status is Status.WASTEFUL
    assert any("keeps its own master" in r.getMessage() for r in caplog.records)


def test_explicit_fp32_with_a_master_keeping_optimizer_is_just_safe():
    strategy = _setup_like(FSDP2Strategy(storage_dtype="fp32"), "bf16-mixed", storage_dtype="fp32")
    (verdict,) = strategy.check_pairing([MasterKeepingAdamW(nn.Linear(2, 2).parameters())])
    assert verdict.status is Status.SAFE


def test_resume_fp32_checkpoint_into_bf16_storage_warns_once():
    strategy = _setup_like(FSDP2Strategy(), "bf16-true")
    with pytest.warns(PrecisionWarning, match="float32.*bfloat16"):
        strategy.report_resume({"storage_dtype": "float32"})


def test_resume_bf16_checkpoint_into_fp32_storage_logs_an_upcast(caplog):
    strategy = _setup_like(FSDP2Strategy(), "bf16-mixed")
    with caplog.at_level(logging.INFO, logger="lightning_precision"), warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.report_resume({"storage_dtype": "bfloat16"})
    assert any("upcast" in r.getMessage() for r in caplog.records)


def test_checkpoint_record_names_storage_and_policy():
    record = resolve_fsdp2_precision("bf16-mixed", optimizer="torch.optim.AdamW").to_dict()
    assert record["storage_dtype"] == "float32"
    assert record["mp_policy"] == {
        "param_dtype": "bfloat16",
        "reduce_dtype": "float32",
        "output_dtype": "bfloat16",
        "cast_forward_inputs": True,
    }
    assert CHECKPOINT_KEY == "lightning_precision_fsdp2"


@pytest.mark.parametrize("new_is_dir", [False, True], ids=["new file", "new dir"])
@pytest.mark.parametrize("old", ["absent", "file", "dir", "symlink"])
def test_staged_checkpoint_replaces_whatever_was_at_the_path(tmp_path, new_is_dir, old):
    from lightning_precision.strategies.fsdp2 import _replace_path

    def make(path, is_dir, text):
        if is_dir:
            path.mkdir()
            (path / "meta.pt").write_text(text)
        else:
            path.write_text(text)

    path, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.incomplete"
    if old == "symlink":  # ModelCheckpoint(save_last="link") leaves last.ckpt as a link to a top-k checkpoint
        make(tmp_path / "epoch=0-step=2.ckpt", True, "old")
        path.symlink_to(tmp_path / "epoch=0-step=2.ckpt")
    elif old != "absent":
        make(path, old == "dir", "old")
    make(staging, new_is_dir, "new")
    _replace_path(staging, path)
    assert not path.is_symlink() and path.is_dir() is new_is_dir
    assert (path / "meta.pt" if new_is_dir else path).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt"] + (["epoch=0-step=2.ckpt"] if old == "symlink" else [])
    )
    if old == "symlink":
        assert (tmp_path / "epoch=0-step=2.ckpt" / "meta.pt").read_text() == "old"  # the link target is untouched
