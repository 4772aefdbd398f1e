"""Reading a run's precision contract back from its checkpoint."""

import pytest
import torch

from lightning_precision import PrecisionGuard
from lightning_precision.callbacks import UpdateUnderflowMonitor
from lightning_precision.callbacks.underflow import METRIC_UPDATE
from lightning_precision.report import PrecisionContract, read_precision_contract
from tests.helpers import RecordingModule, adamw, fit


def small_lr_adamw(params):
    return torch.optim.AdamW(params, lr=1e-5)


def test_read_precision_contract_from_checkpoint_file(tmp_path):
    guard = PrecisionGuard(on_unsafe="ignore")
    trainer = fit(RecordingModule(adamw), steps=2, callbacks=[guard], precision="bf16-mixed", default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    contract = read_precision_contract(tmp_path / "run.ckpt")
    assert contract == guard.contract
    assert (contract.precision, contract.optimizers[0].storage_dtype) == ("bf16-mixed", "float32")


def test_read_precision_contract_without_guard_is_none(tmp_path):
    trainer = fit(RecordingModule(adamw), steps=1, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert read_precision_contract(tmp_path / "run.ckpt") is None


def test_contract_records_monitor_fractions(tmp_path):
    monitor = UpdateUnderflowMonitor(every_n_steps=1)
    trainer = fit(
        RecordingModule(small_lr_adamw),
        steps=2,
        callbacks=[PrecisionGuard(on_unsafe="ignore"), monitor],
        precision="bf16-true",
        default_root_dir=tmp_path,
    )
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    contract = read_precision_contract(torch.load(tmp_path / "run.ckpt", weights_only=True))  # a loaded dict
    assert contract.measured[METRIC_UPDATE] == monitor.latest.stale_update_fraction


def test_contract_written_before_the_accumulation_fields_reads_back():
    old = {"precision": "bf16-true", "compute_dtype": "bfloat16", "reduce_dtype": "-", "optimizers": []}
    contract = PrecisionContract.from_dict(old)
    assert (contract.accumulate_grad_batches, contract.grad_accumulation_dtype) == (1, "-")
    assert PrecisionContract.from_dict(contract.to_dict()) == contract


@pytest.mark.parametrize(
    ("micro_batches", "line"),
    [(16, "gradient accumulation: 16 micro-batches summed in bfloat16"), (1, None), (None, None)],
)
def test_table_names_the_accumulation_only_when_micro_batches_are_summed(micro_batches, line):
    contract = PrecisionContract("bf16-true", "bfloat16", accumulate_grad_batches=micro_batches,
                                 grad_accumulation_dtype="bfloat16")  # fmt: skip
    lines = contract.format_table().splitlines()
    assert (lines[-1] == line) if line else not any("accumulation" in l for l in lines)


def test_contract_says_what_flash_precision_did_to_the_model_dtypes():
    from lightning_precision import FlashPrecision

    guard = PrecisionGuard(on_unsafe="ignore")
    fit(RecordingModule(adamw), steps=1, callbacks=[guard], plugins=[FlashPrecision("bf16-flash")])
    assert guard.contract.model_cast.startswith("float32 model cast to bfloat16")
    assert f"model dtypes: {guard.contract.model_cast}" in guard.contract.format_table()


def test_contract_written_before_model_cast_reads_back_without_it():
    old = {"precision": "bf16-flash", "compute_dtype": "bfloat16", "optimizers": []}
    contract = PrecisionContract.from_dict(old)
    assert contract.model_cast == "" and "model dtypes" not in contract.format_table()


def test_flash_contract_shows_the_float32_tensors_beside_the_bf16_ones_as_flashoptim_keeps_them():
    flashoptim = pytest.importorskip("flashoptim")
    from torch import nn

    from lightning_precision import FlashPrecision
    from lightning_precision.catalogue.state import state_tensor
    from lightning_precision.modes import get_mode
    from lightning_precision.pairing import check_optimizer
    from lightning_precision.report import build_contract

    plugin = FlashPrecision("bf16-flash", keep_batchnorm_fp32=False)  # flashoptim.cast_model keeps the BatchNorm
    model = plugin.convert_module(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.warns(UserWarning, match="master_weight_bits=None"):  # the config FlashOptim allows on CPU
        optimizer = flashoptim.FlashAdamW(model.parameters(), quantize=False, master_weight_bits=None, fused=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    verdict = check_optimizer(optimizer, precision=get_mode("bf16-flash"))
    contract = build_contract(
        "bf16-flash", [optimizer], [verdict], compute_dtype=torch.bfloat16, observe_state=True,
        fp32_modules=plugin.fp32_module_names, model_cast=plugin.model_cast,
    )  # fmt: skip
    (row,) = contract.optimizers
    real = {p.dtype: state_tensor(optimizer.state[p]["exp_avg"]).dtype for p in model.parameters()}
    assert real == {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32}
    assert (row.storage_dtype, row.state_dtype, row.observed) == ("bfloat16", "bfloat16", True)
    assert row.also_updates == "2 float32 tensors (8 elements), state float32"
    table = contract.format_table()
    assert "kept in fp32: 1 (flashoptim.cast_model)" in table
    assert "FlashAdamW also updates 2 float32 tensors (8 elements), state float32" in table


def test_row_written_before_also_updates_reads_back_empty():
    row = {"optimizer": "torch.optim.adamw.AdamW", "storage_dtype": "bfloat16", "state_dtype": "bfloat16",
           "master_weights": "no", "verdict": "unsafe"}  # fmt: skip
    contract = PrecisionContract.from_dict({"precision": "bf16-true", "compute_dtype": "bfloat16", "optimizers": [row]})
    assert contract.optimizers[0].also_updates == "" and "also updates" not in contract.format_table()
