"""End-to-end: a few real training steps under each plugin, asserting what happened to every dtype."""

import warnings

import pytest
import torch

from lightning_precision import FlashPrecision, HalfPrecisionForAudio, PrecisionPairingError, PrecisionWarning
from tests.helpers import RecordingModule, adamw, fit


def flash_adamw_cpu(params):
    flashoptim = pytest.importorskip("flashoptim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flashoptim's own note on master_weight_bits=None
        return flashoptim.FlashAdamW(params, lr=1e-3, quantize=False, master_weight_bits=None, fused=False)


@pytest.mark.parametrize(
    ("make_kwargs", "storage", "state", "default_in_step", "autocast"),
    [
        pytest.param(
            lambda: {"precision": "bf16-mixed"}, torch.float32, torch.float32, torch.float32, True, id="bf16-mixed"
        ),
        pytest.param(
            lambda: {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="ignore")]},
            torch.bfloat16,
            torch.bfloat16,
            torch.bfloat16,
            False,
            id="bf16-true",
        ),
        pytest.param(
            lambda: {"plugins": [FlashPrecision("bf16-flash", on_unsafe="ignore")]},
            torch.bfloat16,
            torch.bfloat16,
            torch.float32,
            False,
            id="bf16-flash-torch-adamw",
        ),
    ],
)
def test_fit_records_expected_dtypes(make_kwargs, storage, state, default_in_step, autocast):
    module = RecordingModule(adamw)
    fit(module, **make_kwargs())
    last = module.seen[-1]
    assert last["param"] == storage
    assert module.state_dtypes == {"exp_avg": state, "exp_avg_sq": state}
    assert last["default"] == default_in_step
    assert last["autocast"] is autocast
    assert last["audio"] == torch.float32
    assert last["idx"] == torch.int64
    half_inputs = storage != torch.float32
    assert last["x"] == (torch.bfloat16 if half_inputs else torch.float32)
    assert torch.get_default_dtype() == torch.float32


def test_flash_with_flash_adamw_on_cpu():
    module = RecordingModule(flash_adamw_cpu)
    fit(module, plugins=[FlashPrecision("bf16-flash", on_unsafe="ignore")])
    last = module.seen[-1]
    assert last["param"] == torch.bfloat16
    assert last["default"] == torch.float32 and last["autocast"] is False
    assert last["audio"] == torch.float32 and last["x"] == torch.bfloat16
    # Without master_weight_bits flashoptim keeps its moments in the parameter dtype: the rule calls it unsafe.
    assert module.state_dtypes == {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}


def test_bf16_true_adamw_raises_before_any_step_under_error():
    module = RecordingModule(adamw)
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        fit(module, plugins=[HalfPrecisionForAudio("bf16-true", on_unsafe="error")])
    assert module.seen == []


def test_bf16_true_adamw_warns_once_across_fits():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fit(RecordingModule(adamw), steps=1, plugins=[HalfPrecisionForAudio("bf16-true")])
    ours = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(ours) == 1
    assert "torch.optim.adamw.AdamW" in str(ours[0].message)
