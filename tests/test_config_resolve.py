"""Only what is read is resolved: NeMo's ??? and app-only resolvers elsewhere in the model section stay untouched."""

import pytest
import torch
from omegaconf import OmegaConf

from lightning_precision import PrecisionConfigError, Status, resolve_trainer_cfg
from lightning_precision.config_resolve import model_read_part, resolve_value

NEMO = {
    "trainer": {"precision": "bf16-mixed", "devices": 1},
    "model": {
        "train_ds": {"manifest_filepath": "???"},
        "encoder": {"d_model": "${sum:1,2}"},
        "optim": {"name": "adamw", "lr": 1e-3, "sched": {"d_model": "${model.encoder.d_model}", "max_steps": "???"}},
    },
}


def test_resolve_trainer_cfg_reads_a_nemo_model_with_placeholders_elsewhere():
    cfg = OmegaConf.create(NEMO)
    kwargs = resolve_trainer_cfg(cfg.trainer, model=cfg.model)
    clean = resolve_trainer_cfg({"precision": "bf16-mixed"}, model={"optim": {"name": "adamw", "lr": 1e-3}})
    assert kwargs.storage_dtype == clean.storage_dtype == torch.float32
    assert kwargs.verdict.status is clean.verdict.status is Status.SAFE
    assert kwargs.optimizer == clean.optimizer == {"_target_": "torch.optim.AdamW", "lr": 1e-3}
    assert OmegaConf.is_missing(cfg.model.train_ds, "manifest_filepath")  # the input is untouched


def test_model_read_part_keeps_only_what_is_read_and_drops_the_scheduler():
    part = model_read_part(OmegaConf.create(NEMO).model)
    assert part == {"optim": {"name": "adamw", "lr": 1e-3}}


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("model.optim.lr", "???", "model.optim.lr is '???'"),
        ("model.torch_dtype", "???", "model.torch_dtype is '???'"),  # reported, not read as unset
        ("model.optim.betas", [0.9, "${sum:1,2}"], "model.optim.betas[1] cannot be resolved"),
        ("trainer.precision", "???", "trainer.precision is '???'"),
        ("trainer.precision", "${model.encoder.d_model}", "trainer.precision cannot be resolved"),
    ],
)
def test_a_placeholder_in_a_value_that_is_read_is_an_error_naming_its_path(path, value, named):
    cfg = OmegaConf.create(NEMO)
    OmegaConf.update(cfg, path, value, force_add=True)
    with pytest.raises(PrecisionConfigError) as err:
        resolve_trainer_cfg(cfg.trainer, model=cfg.model)
    assert named in str(err.value)


def test_resolve_value_keeps_plain_values_and_tuples():
    assert resolve_value({"betas": (0.9, 0.95), "obj": torch.float32}, path="optimizer") == {
        "betas": (0.9, 0.95),
        "obj": torch.float32,
    }
