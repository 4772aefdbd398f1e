"""FlashAdamW's CUDA path: error-correction bits and quantized moments under FlashPrecision.

These run only where CUDA is available; on CPU they are skipped with the reason (flashoptim raises
NotImplementedError for these settings there). Nothing here is faked on CPU.
"""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_precision import FlashPrecision, PrecisionGuard, PrecisionWarning, Status, check_optimizer
from tests.helpers import RecordingModule, loader

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="flashoptim's error-correction bits, quantized moments and fused step need a CUDA device",
    ),
]


def flash_adamw_ecc(params):
    import flashoptim

    return flashoptim.FlashAdamW(params, lr=1e-3, master_weight_bits=24)  # quantize and fused: flashoptim defaults


def _trainer(tmp_path, steps, **kwargs):
    return pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[FlashPrecision("bf16-flash", on_unsafe="error")],
        **kwargs,
    )


def test_flash_adamw_with_error_correction_is_safe_and_keeps_bf16_storage(tmp_path):
    module = RecordingModule(flash_adamw_ecc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, 3, callbacks=[PrecisionGuard(on_unsafe="error")], enable_checkpointing=False)
        trainer.fit(module, loader())
    assert not any(issubclass(w.category, PrecisionWarning) for w in caught)
    optimizer = trainer.optimizers[0]
    assert check_optimizer(optimizer).status is Status.SAFE
    assert module.seen[-1]["param"] == torch.bfloat16 and module.seen[-1]["audio"] == torch.float32
    state = optimizer.state[module.net[0].weight]
    assert state["error_bits"].dtype == torch.int8  # 24-bit master: one byte of error correction per bf16 value


def test_flash_adamw_with_error_correction_resumes_bitwise(tmp_path):
    n = 4
    pl.seed_everything(0, verbose=False)
    straight = RecordingModule(flash_adamw_ecc)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=n, save_top_k=-1)
    first = _trainer(tmp_path, 2 * n, callbacks=[ckpt])
    first.fit(straight, loader())
    pl.seed_everything(0, verbose=False)
    resumed = RecordingModule(flash_adamw_ecc)
    second = _trainer(tmp_path, 2 * n, enable_checkpointing=False)
    second.fit(resumed, loader(), ckpt_path=tmp_path / f"step={n}.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a_state = first.optimizers[0].state[straight.net[0].weight]
    b_state = second.optimizers[0].state[resumed.net[0].weight]
    assert torch.equal(a_state["error_bits"], b_state["error_bits"])


def test_contract_after_the_first_step_reads_the_quantized_moments(tmp_path):
    from lightning_precision.catalogue import classify_optimizer

    guard = PrecisionGuard(on_unsafe="error")
    trainer = _trainer(tmp_path, 2, callbacks=[guard], enable_checkpointing=False)
    trainer.fit(RecordingModule(flash_adamw_ecc), loader())
    (row,) = guard.contract.optimizers
    # Quantized moments hold int8 (exp_avg) / uint8 (exp_avg_sq) values with fp16 scales: read, never dequantized.
    assert row.observed is True and set(row.state_dtype.split(" / ")) <= {"int8", "uint8"}
    assert classify_optimizer(trainer.optimizers[0]).state_text(torch.bfloat16) == "int8+scales (CUDA)"
