"""A single-process resume whose optimizer differs from the one that saved: converted, or refused naming both."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_precision import CheckedMixedPrecision, HalfPrecisionForAudio, PrecisionGuard, PrecisionWarning
from lightning_precision.errors import OptimizerStateError
from lightning_precision.optim import CompensatedAdamW
from tests.helpers import RecordingModule, adamw, loader


def compensated(params):
    return CompensatedAdamW(params, lr=1e-3)


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


PLUGINS = {
    "bf16-true": lambda: HalfPrecisionForAudio("bf16-true", on_unsafe="ignore", keep_trainable_fp32=False),
    "bf16-mixed": lambda: CheckedMixedPrecision("bf16-mixed", on_unsafe="ignore"),
}


def _fit(tmp_path, plugin, optimizer, steps, ckpt_path=None):
    module = RecordingModule(optimizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[PrecisionGuard(on_unsafe="ignore", log_table=False)],
        plugins=[PLUGINS[plugin]()],
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer


def _save(tmp_path, plugin, optimizer, steps=4):
    _, trainer = _fit(tmp_path, plugin, optimizer, steps)
    path = tmp_path / f"{plugin}.ckpt"
    trainer.save_checkpoint(path)
    return path, torch.load(path, weights_only=False)


def test_compensated_bf16_state_resumed_by_torch_adamw_in_fp32_is_folded_into_the_weights(tmp_path):
    path, saved = _save(tmp_path, "bf16-true", compensated)
    comp = saved["optimizer_states"][0]["state"]
    module, trainer = _fit(tmp_path, "bf16-mixed", adamw, 4, ckpt_path=path)  # resumed at step 4: no further step
    weight = dict(module.named_parameters())["net.0.weight"]
    expected = saved["state_dict"]["net.0.weight"].float() + comp[0]["compensation"].float()
    assert weight.dtype == torch.float32 and torch.equal(weight.detach(), expected)
    assert all("compensation" not in s for s in trainer.optimizers[0].state.values())


def test_compensated_bf16_state_resumed_by_torch_adamw_in_bf16_is_refused_naming_both(tmp_path):
    path, _ = _save(tmp_path, "bf16-true", compensated)
    with pytest.raises(OptimizerStateError, match=r"torch\.optim\.adamw\.AdamW cannot resume.*CompensatedAdamW"):
        _fit(tmp_path, "bf16-true", adamw, 6, ckpt_path=path)


def test_fp32_checkpoint_resumed_in_bf16_by_compensated_adamw_keeps_the_residual(tmp_path):
    path, saved = _save(tmp_path, "bf16-mixed", adamw)
    module, trainer = _fit(tmp_path, "bf16-true", compensated, 4, ckpt_path=path)
    weight = dict(module.named_parameters())["net.0.weight"]
    comp = trainer.optimizers[0].state[weight]["compensation"]
    wide = saved["state_dict"]["net.0.weight"]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), wide.to(torch.bfloat16))
    assert torch.equal(comp, (wide - weight.detach().float()).to(torch.bfloat16))
    assert comp.abs().sum() > 0  # the residual, not a zero compensation


def test_sgd_state_resumed_by_adamw_is_refused_naming_both(tmp_path):
    path, _ = _save(tmp_path, "bf16-mixed", sgd)
    with pytest.raises(
        OptimizerStateError, match=r"AdamW cannot resume the optimizer state saved by torch\.optim\.SGD"
    ):
        _fit(tmp_path, "bf16-mixed", adamw, 6, ckpt_path=path)


@pytest.mark.parametrize(
    ("key", "value", "what"), [("exp_avg", float("nan"), "nan/inf"), ("exp_avg_sq", -1.0, "negative")]
)
def test_a_corrupt_saved_state_is_refused_naming_the_tensor(tmp_path, key, value, what):
    path, saved = _save(tmp_path, "bf16-mixed", adamw)
    saved["optimizer_states"][0]["state"][1][key].view(-1)[0] = value
    torch.save(saved, path)
    with pytest.raises(OptimizerStateError, match=rf"state\['{key}'\] of net\.0\.bias holds {what} values"):
        _fit(tmp_path, "bf16-mixed", adamw, 6, ckpt_path=path)


def test_a_narrowing_resume_of_a_checkpoint_without_contract_is_warned_from_its_tensors(tmp_path):
    path, saved = _save(tmp_path, "bf16-mixed", adamw)
    del saved["precision_contract"]  # a plain Lightning checkpoint: no contract to compare with
    torch.save(saved, path)
    with pytest.warns(PrecisionWarning, match=r"stores no precision contract.*stored in float32 into bfloat16 storage"):
        _fit(tmp_path, "bf16-true", adamw, 4, ckpt_path=path)
