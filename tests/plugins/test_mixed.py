"""CheckedMixedPrecision."""

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_precision import CheckedMixedPrecision, PrecisionPairingError
from tests.helpers import RecordingModule, fit


class LoadedInBf16(RecordingModule):
    def configure_optimizers(self):
        self.to(torch.bfloat16)  # e.g. from_pretrained(torch_dtype=bfloat16)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_is_lightning_mixed_precision(precision):
    plugin = CheckedMixedPrecision(precision, device="cpu")
    assert isinstance(plugin, MixedPrecision) and plugin.precision == precision
    assert (plugin.scaler is not None) == (precision == "16-mixed")


def test_bf16_loaded_model_under_autocast_is_refused_under_error():
    module = LoadedInBf16()
    with pytest.raises(PrecisionPairingError, match="bfloat16"):
        fit(module, plugins=[CheckedMixedPrecision("bf16-mixed", device="cpu", on_unsafe="error")])
    assert module.seen == []


def test_fp32_model_under_autocast_trains():
    module = RecordingModule()
    fit(module, plugins=[CheckedMixedPrecision("bf16-mixed", device="cpu", on_unsafe="error")])
    assert module.seen[-1]["autocast"] and module.seen[-1]["param"] == torch.float32


@pytest.mark.parametrize("bad", ["bf16-true", "32-true", "bf16"])
def test_rejects_other_precisions_with_the_call(bad):
    with pytest.raises(ValueError, match=rf"CheckedMixedPrecision\(precision='{bad}'\)"):
        CheckedMixedPrecision(bad)
