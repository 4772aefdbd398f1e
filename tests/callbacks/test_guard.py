"""PrecisionGuard: the runtime check and the precision contract."""

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from lightning_precision import PrecisionContract, PrecisionGuard, PrecisionPairingError, PrecisionWarning
from lightning_precision.callbacks.guard import CHECKPOINT_KEY
from tests.helpers import RecordingModule, adamw, fit, loader


class LatePairing(RecordingModule):
    """Builds a bf16 model with torch AdamW inside configure_optimizers: no config shows this pairing."""

    def configure_optimizers(self):
        self.to(torch.bfloat16)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_guard_catches_pairing_built_in_configure_optimizers():
    module = LatePairing()
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        fit(module, callbacks=[PrecisionGuard(on_unsafe="error")])
    assert module.seen == []


def test_guard_with_lightning_plugin_warns_once_over_fits():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            fit(RecordingModule(adamw), steps=1, plugins=[HalfPrecision("bf16-true")], callbacks=[PrecisionGuard()])
    assert sum(issubclass(w.category, PrecisionWarning) for w in caught) == 1


def test_guard_ignore_is_silent():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(RecordingModule(adamw), steps=1, plugins=[HalfPrecision("bf16-true")], callbacks=[PrecisionGuard("ignore")])
    assert not any(issubclass(w.category, PrecisionWarning) for w in caught)


@pytest.mark.parametrize(
    ("kwargs", "storage", "compute", "verdict"),
    [
        ({"precision": "bf16-mixed"}, "float32", "bfloat16", "safe"),
        ({"precision": "32-true"}, "float32", "float32", "safe"),
        ({"plugins": [HalfPrecision("bf16-true")]}, "bfloat16", "bfloat16", "unsafe"),
    ],
)
def test_contract_reports_observed_state_after_first_step(kwargs, storage, compute, verdict, caplog):
    guard = PrecisionGuard(on_unsafe="ignore")
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        fit(RecordingModule(adamw), steps=2, callbacks=[guard], **kwargs)
    (row,) = guard.contract.optimizers
    assert (row.storage_dtype, guard.contract.compute_dtype, row.verdict) == (storage, compute, verdict)
    assert row.observed and row.state_dtype == storage  # torch AdamW: state follows the parameter
    assert "Precision contract" in caplog.text and "(predicted)" in caplog.text  # fit start: before any step


def test_contract_in_checkpoint_and_round_trips(tmp_path):
    guard = PrecisionGuard(on_unsafe="ignore")
    trainer = fit(RecordingModule(adamw), steps=2, callbacks=[guard], precision="bf16-mixed", default_root_dir=tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=False)[CHECKPOINT_KEY]
    restored = PrecisionContract.from_dict(stored)
    assert restored == guard.contract
    assert restored.optimizers[0].optimizer == "torch.optim.adamw.AdamW"


def test_contract_logged_as_hyperparameters(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    fit(RecordingModule(adamw), steps=1, callbacks=[PrecisionGuard()], logger=logger, precision="bf16-mixed")
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert CHECKPOINT_KEY in hparams and "bf16-mixed" in hparams


def test_guard_rejects_bad_policy():
    with pytest.raises(ValueError, match="PrecisionGuard"):
        PrecisionGuard(on_unsafe="yes")


def test_guard_reads_strategy_dtypes():
    class Strategy(pl.strategies.SingleDeviceStrategy):
        compute_dtype = torch.float16
        reduce_dtype = torch.float32

    guard = PrecisionGuard(on_unsafe="ignore")
    fit(RecordingModule(adamw), steps=1, callbacks=[guard], strategy=Strategy(device="cpu"))
    assert (guard.contract.compute_dtype, guard.contract.reduce_dtype) == ("float16", "float32")


@pytest.mark.parametrize(("policy", "says_see_warning"), [("warn", True), ("ignore", False)])
def test_table_points_at_a_warning_only_when_one_is_printed(policy, says_see_warning, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_precision"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        fit(RecordingModule(adamw), steps=1, plugins=[HalfPrecision("bf16-true")], callbacks=[PrecisionGuard(policy)])
    assert ("see warning" in caplog.text) is says_see_warning


@pytest.mark.parametrize(("accumulate_grad_dtype", "summed_in"), [(None, "bfloat16"), ("float32", "float32")])
def test_contract_records_micro_batches_and_their_sum_dtype(accumulate_grad_dtype, summed_in):
    from lightning_precision import HalfPrecisionForAudio

    guard = PrecisionGuard(on_unsafe="ignore")
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype=accumulate_grad_dtype)
    fit(RecordingModule(adamw), steps=1, callbacks=[guard], plugins=[plugin], accumulate_grad_batches=4)
    assert (guard.contract.accumulate_grad_batches, guard.contract.grad_accumulation_dtype) == (4, summed_in)


def test_a_refit_with_the_same_guard_observes_the_new_runs_state():
    from lightning_precision import HalfPrecisionForAudio
    from lightning_precision.optim import CompensatedAdamW

    guard, module = PrecisionGuard(), RecordingModule(lambda p: CompensatedAdamW(p, lr=1e-3))
    contracts = []
    for _ in range(2):
        plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32")
        fit(module, steps=1, callbacks=[guard], plugins=[plugin], accumulate_grad_batches=2)
        contracts.append(guard.contract)
    assert contracts[1] is not contracts[0] and contracts[1].to_dict() == contracts[0].to_dict()
    assert contracts[1].optimizers[0].observed


def test_after_a_resume_the_logged_state_dtypes_are_read_from_the_loaded_state_not_predicted(tmp_path, caplog):
    first = fit(RecordingModule(), steps=2, callbacks=[PrecisionGuard()])
    first.save_checkpoint(tmp_path / "run.ckpt")
    caplog.clear()  # only the resumed fit's lines
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        resumed = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, max_steps=3, callbacks=[PrecisionGuard()],
        )  # fmt: skip
        resumed.fit(RecordingModule(), loader(), ckpt_path=tmp_path / "run.ckpt")
    tables = [r.getMessage() for r in caplog.records if "resumed: state read from the checkpoint" in r.getMessage()]
    assert len(tables) == 1 and "(predicted)" not in tables[0]
    assert not any("(fit start" in r.getMessage() for r in caplog.records)  # no prediction of the loaded state
