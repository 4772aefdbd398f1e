"""Reading NeMo, LightningCLI and Hydra layouts: where the optimizer and the storage dtype are found, and how."""

import logging

import pytest
import torch

from lightning_precision import PrecisionConfigError, PrecisionPairingError, Status, resolve_trainer_cfg
from lightning_precision._imports import import_object
from lightning_precision.config_layouts import (
    HYDRA_COMPOSE_HINT,
    NEMO_OPTIMIZERS,
    find_optimizer,
    find_torch_dtype,
    read_run_layout,
)

NEMO_ADAMW = {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.98], "sched": {"name": "CosineAnnealing"}}


@pytest.mark.parametrize("name", sorted(n for n, p in NEMO_OPTIMIZERS.items() if p.startswith("torch.")))
def test_nemo_torch_names_map_to_the_torch_class_of_that_name(name):
    cls = import_object(NEMO_OPTIMIZERS[name])
    assert cls.__module__.startswith("torch.optim") and cls.__name__.lower() == name


def test_nemo_optim_becomes_a_target_config_without_nemo_keys():
    found = find_optimizer({"optim": NEMO_ADAMW})
    assert found.value == {"_target_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.98]}
    assert found.path == "model.optim" and "torch.optim.AdamW" in found.note


def test_nemo_only_optimizer_maps_to_its_real_class_path():
    found = find_optimizer({"optim": {"name": "fused_adam", "lr": 1e-3}})
    assert found.value == {"_target_": "apex.optimizers.FusedAdam", "lr": 1e-3}


def test_nemo_optim_without_a_name_is_nemos_default_adam():
    found = find_optimizer({"optim": {"lr": 1e-3}})
    assert found.value == {"_target_": "torch.optim.Adam", "lr": 1e-3} and "default adam" in found.note


def test_nemo_optim_target_and_older_args_form():
    assert find_optimizer({"optim": {"_target_": "torch.optim.SGD", "lr": 0.1, "sched": {}}}).value == {
        "_target_": "torch.optim.SGD",
        "lr": 0.1,
    }
    older = {"name": "sgd", "lr": 0.1, "args": {"name": "auto", "params": {"momentum": 0.9}}}
    assert find_optimizer({"optim": older}).value == {"_target_": "torch.optim.SGD", "momentum": 0.9, "lr": 0.1}


def test_unknown_nemo_name_lists_the_known_names():
    with pytest.raises(PrecisionConfigError, match=r"model\.optim\.name='adamq'") as err:
        find_optimizer({"optim": {"name": "adamq"}})
    assert all(name in str(err.value) for name in ("adamw", "fused_adam", "novograd"))


@pytest.mark.parametrize(
    ("model", "optimizer", "path"),
    [
        (None, {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}, "optimizer"),
        (None, {"class_path": "AdamW", "init_args": {"lr": 0.1}}, "optimizer"),  # jsonargparse's short form
        ({"optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.1}}, None, "model.optimizer"),
        ({"init_args": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}}}, None,
         "model.init_args.optimizer"),
    ],
    ids=["lightning-cli-top-level", "short-class-name", "model-optimizer", "model-init-args-optimizer"],
)
def test_lightning_cli_layouts_become_target_configs(model, optimizer, path):
    found = find_optimizer(model, optimizer)
    assert found.value == {"_target_": "torch.optim.AdamW", "lr": 0.1} and found.path == path


def test_disagreeing_optimizer_sections_name_both_paths():
    with pytest.raises(PrecisionConfigError, match=r"optimizer and model\.optim .*disagree") as err:
        find_optimizer({"optim": {"name": "sgd", "lr": 0.1}}, {"_target_": "torch.optim.AdamW"})
    assert "torch.optim.sgd.SGD" in str(err.value) and "torch.optim.adamw.AdamW" in str(err.value)
    with pytest.raises(PrecisionConfigError, match=r"lr: 0\.1 vs 0\.2"):
        find_optimizer({"optim": {"name": "adamw", "lr": 0.2}}, {"_target_": "torch.optim.AdamW", "lr": 0.1})


def test_agreeing_optimizer_sections_are_merged():
    found = find_optimizer({"optim": {"name": "adamw", "betas": [0.9, 0.98]}}, "torch.optim.adamw.AdamW")
    assert found.path == "optimizer" and found.value == {"_target_": "torch.optim.adamw.AdamW", "betas": [0.9, 0.98]}


def test_torch_dtype_in_lightning_cli_init_args_and_conflicts():
    assert find_torch_dtype({"init_args": {"torch_dtype": "bf16"}}).path == "model.init_args.torch_dtype"
    assert find_torch_dtype({"torch_dtype": "bf16", "init_args": {"torch_dtype": "bfloat16"}}).value == "bf16"
    with pytest.raises(PrecisionConfigError, match=r"model\.torch_dtype='bf16' and model\.init_args\.torch_dtype"):
        find_torch_dtype({"torch_dtype": "bf16", "init_args": {"torch_dtype": "float32"}})


def test_run_layout_notes_ignored_sections_once_and_logs_them(caplog):
    cfg = {"name": "x", "exp_manager": {}, "hydra": {}, "trainer": {}, "model": {}, "defaults": ["_self_"]}
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        layout = read_run_layout(cfg, source="run.yaml")
    assert layout.notes[0] == "ignored top-level section(s) exp_manager, hydra, name: not about precision"
    assert "run.yaml has a Hydra 'defaults' list" in layout.notes[1] and HYDRA_COMPOSE_HINT in layout.notes[1]
    assert [r.getMessage() for r in caplog.records] == [f"lightning_precision: {n}." for n in layout.notes]


def test_uncomposed_hydra_file_without_trainer_says_to_compose():
    with pytest.raises(PrecisionConfigError, match=r"needs a 'trainer:' mapping.*--cfg job"):
        read_run_layout({"defaults": [{"trainer": "default"}]})


def test_resolve_trainer_cfg_reads_a_nemo_model_section():
    model = {"sample_rate": 16000, "optim": NEMO_ADAMW}
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        resolve_trainer_cfg({"precision": "bf16-true"}, model=model, on_unsafe="error")
    kwargs = resolve_trainer_cfg({"precision": "bf16-mixed"}, model=model)
    assert kwargs.storage_dtype == torch.float32 and kwargs.verdict.status is Status.SAFE
    assert kwargs.optimizer_path == "model.optim" and kwargs.optimizer["_target_"] == "torch.optim.AdamW"


def test_resolve_trainer_cfg_names_the_lightning_cli_dtype_path_in_a_contradiction():
    model = {"class_path": "my.Module", "init_args": {"torch_dtype": "bfloat16", "optimizer": "torch.optim.AdamW"}}
    with pytest.raises(PrecisionConfigError, match=r"model\.init_args\.torch_dtype=bfloat16 contradicts"):
        resolve_trainer_cfg({"precision": "32-true"}, model=model)


def test_resolve_storage_dtype_reads_the_lightning_cli_dtype_too():
    from omegaconf import OmegaConf

    from lightning_precision.storage import resolve_storage_dtype

    model = OmegaConf.create({"class_path": "my.Module", "init_args": {"torch_dtype": "bf16"}})
    assert resolve_storage_dtype(model, "torch.optim.AdamW") == torch.bfloat16
