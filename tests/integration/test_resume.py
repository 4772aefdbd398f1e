"""Checkpoint and resume in every single-process mode: stop at N, resume to 2N, compare with a straight run."""

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_precision import (
    CheckedMixedPrecision,
    FlashPrecision,
    HalfPrecisionForAudio,
    PrecisionGuard,
    PrecisionWarning,
)
from tests.helpers import RecordingModule, adamw, loader, needs_lightning_2_5_resume

N = 4  # one epoch of the helper loader (16 samples, batch 4): resuming at an epoch boundary replays no batch


def flash_adamw_cpu(params):
    flashoptim = pytest.importorskip("flashoptim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flashoptim.FlashAdamW(params, lr=1e-3, quantize=False, master_weight_bits=None, fused=False)


MODES = {
    "32-true": (lambda: {"precision": "32-true"}, adamw),
    "bf16-mixed": (lambda: {"precision": "bf16-mixed"}, adamw),
    # Lightning gives 16-mixed a loss scaler only on CUDA; the plugin builds a CPU one, so its state is tested here.
    "16-mixed": (lambda: {"plugins": [CheckedMixedPrecision("16-mixed", device="cpu")]}, adamw),
    "bf16-true": (lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="ignore")]}, adamw),
    "bf16-flash": (lambda: {"plugins": [FlashPrecision("bf16-flash", on_unsafe="ignore")]}, flash_adamw_cpu),
}


def _run(mode, steps, tmp_path, ckpt_path=None, save_as=None, checkpoint_every=None):
    make_kwargs, optimizer = MODES[mode]
    callbacks = [PrecisionGuard(on_unsafe="ignore")]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    pl.seed_everything(0, verbose=False)
    module = RecordingModule(optimizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **make_kwargs(),
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    if save_as is not None:
        trainer.save_checkpoint(save_as)
    return module, trainer


def _state_tensors(trainer):
    """Every optimizer-state tensor, by parameter index and key (flashoptim's wrappers unwrapped)."""
    out = {}
    for i, state in trainer.optimizers[0].state_dict()["state"].items():
        for key, value in state.items():
            out[(i, key)] = getattr(value, "data", value)
    return out


@needs_lightning_2_5_resume
@pytest.mark.parametrize("mode", MODES)
def test_resume_matches_uninterrupted_run_bitwise(mode, tmp_path):
    # The uninterrupted run also writes the step-N checkpoint, as a real run would.
    straight, straight_trainer = _run(mode, 2 * N, tmp_path, checkpoint_every=N)
    resumed, resumed_trainer = _run(mode, 2 * N, tmp_path, ckpt_path=tmp_path / f"step={N}.ckpt")

    assert resumed_trainer.global_step == straight_trainer.global_step == 2 * N
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    expected, got = _state_tensors(straight_trainer), _state_tensors(resumed_trainer)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        # CPU kernels are deterministic and the data order is replayed exactly: equal to the bit.
        assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key


def test_resume_into_narrower_storage_warns(tmp_path):
    ckpt = tmp_path / "fp32.ckpt"
    _run("bf16-mixed", N, tmp_path, save_as=ckpt)
    with pytest.warns(PrecisionWarning, match="stored in float32.*into bfloat16 storage"):
        _run("bf16-true", 2 * N, tmp_path, ckpt_path=ckpt)


def test_resume_into_wider_storage_is_logged(tmp_path, caplog):
    ckpt = tmp_path / "bf16.ckpt"
    _run("bf16-true", N, tmp_path, save_as=ckpt)
    with caplog.at_level(logging.INFO, logger="lightning_precision"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run("32-true", 2 * N, tmp_path, ckpt_path=ckpt)
    assert "stored in bfloat16" in caplog.text and "upcast exactly" in caplog.text
    assert not any(issubclass(w.category, PrecisionWarning) for w in caught)


def test_loss_scaler_state_restored(tmp_path):
    _, straight_trainer = _run("16-mixed", 2 * N, tmp_path, checkpoint_every=N)
    stored = torch.load(tmp_path / f"step={N}.ckpt", weights_only=False)
    assert stored["CheckedMixedPrecision"]["scale"] > 0  # the scaler's state is in the checkpoint
    _, resumed_trainer = _run("16-mixed", 2 * N, tmp_path, ckpt_path=tmp_path / f"step={N}.ckpt")
    expected = straight_trainer.precision_plugin.state_dict()
    assert resumed_trainer.precision_plugin.state_dict() == expected


def _compensated(params):
    from lightning_precision.optim import CompensatedAdamW

    return CompensatedAdamW(params, lr=1e-3)


class _WeightsAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


@pytest.mark.parametrize("resume_precision", ["bf16-mixed", "32-true"])
def test_compensated_bf16_run_resumed_with_fp32_storage_trains_from_p_plus_c_exactly(tmp_path, resume_precision):
    """Widening a CompensatedAdamW run: the fp32 parameters are p + compensation, bitwise (no KeyError, nothing
    dropped): the widening loses nothing."""
    pl.seed_everything(0, verbose=False)
    module = RecordingModule(_compensated)
    first = pl.Trainer(
        accelerator="cpu", max_steps=N, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[HalfPrecisionForAudio("bf16-true")], callbacks=[PrecisionGuard()],
    )  # fmt: skip
    first.fit(module, loader())
    first.save_checkpoint(tmp_path / "bf16.ckpt")
    optimizer = first.optimizers[0]
    expected = {
        name: p.detach().float() + optimizer.state[p]["compensation"].float() for name, p in module.named_parameters()
    }
    assert any(bool((optimizer.state[p]["compensation"] != 0).any()) for p in module.parameters())

    seen = _WeightsAtTrainStart()
    resumed = pl.Trainer(
        accelerator="cpu", max_steps=N + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, precision=resume_precision, callbacks=[PrecisionGuard(), seen],
    )  # fmt: skip
    resumed.fit(RecordingModule(_compensated), loader(), ckpt_path=tmp_path / "bf16.ckpt")
    for name, value in expected.items():
        assert seen.weights[name].dtype == torch.float32 and torch.equal(seen.weights[name], value), name
    assert resumed.global_step == N + 1
