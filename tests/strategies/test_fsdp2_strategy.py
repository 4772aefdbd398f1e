"""FSDP2Strategy's own logic in one process without a process group: options, configs, pairing, resume."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_precision import FSDP2Strategy, PrecisionConfigError, Status, resolve_trainer_cfg
from lightning_precision.strategies import resolve_fsdp2_precision
from lightning_precision.strategies.fsdp2_checkpoints import CHECKPOINT_KEY

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


def test_strategy_policy_and_config_policy_that_disagree_are_a_config_error():
    strategy = FSDP2Strategy(optimizer="torch.optim.SGD", on_unsafe="ignore")
    with pytest.raises(
        PrecisionConfigError,
        match=r"lightning_precision.on_unsafe is 'error' and FSDP2Strategy\(on_unsafe=\.\.\.\) is 'ignore'",
    ):
        resolve_trainer_cfg(
            {"strategy": strategy, "lightning_precision": {"on_unsafe": "error"}}, optimizer="torch.optim.SGD"
        )


def test_strategy_optimizer_and_config_optimizer_that_disagree_are_a_config_error():
    strategy = FSDP2Strategy(optimizer="torch.optim.SGD")
    with pytest.raises(PrecisionConfigError, match="SGD.*AdamW.*disagree"):
        resolve_trainer_cfg({"strategy": strategy}, optimizer="torch.optim.AdamW")


def test_strategy_options_are_kept_when_the_config_agrees():
    strategy = FSDP2Strategy(optimizer="torch.optim.SGD", on_unsafe="ignore")
    resolve_trainer_cfg(
        {"strategy": strategy, "lightning_precision": {"on_unsafe": "ignore"}},
        optimizer={"_target_": "torch.optim.SGD"},
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


def test_checkpoint_record_names_storage_and_policy():
    record = resolve_fsdp2_precision("bf16-mixed", optimizer="torch.optim.AdamW").to_dict()
    assert record["storage_dtype"] == "float32"
    assert record["mp_policy"] == {
        "param_dtype": "bfloat16",
        "reduce_dtype": "float32",
        "output_dtype": "float32",
        "cast_forward_inputs": True,
    }
    assert CHECKPOINT_KEY == "lightning_precision_fsdp2"


@pytest.mark.parametrize("option", ["reshard_after_forward", "autocast", "save_distributed_checkpoint", "peft"])
@pytest.mark.parametrize(("text", "value"), [("false", False), ("True", True), ("no", False)])
def test_boolean_flags_given_as_strings_are_read_not_truth_tested(option, text, value):
    strategy = FSDP2Strategy(**{option: text})
    attribute = "_save_distributed_checkpoint" if option == "save_distributed_checkpoint" else option
    assert getattr(strategy, attribute) is value


def test_boolean_flag_that_is_not_a_boolean_is_refused_naming_it():
    with pytest.raises(PrecisionConfigError, match=r"reshard_after_forward=...\): 'sometimes'"):
        FSDP2Strategy(reshard_after_forward="sometimes")


# -- teardown (no process group needed) -------------------------------------------------------------------------------


def test_teardown_releases_the_fp32_accumulation_buffers_and_hooks():
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    strategy = FSDP2Strategy(accumulate_grad_dtype="float32")
    strategy.accelerator, strategy.cluster_environment = CPUAccelerator(), LightningEnvironment()
    module = nn.Linear(4, 4).bfloat16()  # plain parameters, as a model the strategy did not shard carries
    strategy.grad_accumulator.attach(module.named_parameters())
    module(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()  # a sum left pending, as an interrupted fit
    strategy.teardown()
    assert not strategy.grad_accumulator.pending
    assert [len(p._post_accumulate_grad_hooks or {}) for p in module.parameters()] == [0, 0]


def test_replacing_lightnings_amp_plugin_says_what_really_casts(caplog):
    """Lightning prints "Using bfloat16 Automatic Mixed Precision (AMP)" before the strategy turns autocast off; the
    strategy's own line says the policy does the casting, so the two do not contradict each other unexplained."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    strategy = FSDP2Strategy()
    strategy.precision_plugin = MixedPrecision("bf16-mixed", "cpu")
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        strategy._disable_autocast_unless_asked()
    assert type(strategy.precision_plugin).__name__ == "_PolicyMixedPrecision"
    assert any("autocast is off" in r.getMessage() and "MixedPrecisionPolicy" in r.getMessage() for r in caplog.records)
