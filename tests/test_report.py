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
