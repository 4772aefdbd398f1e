"""HalfPrecisionForAudio."""

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from lightning_precision import HalfPrecisionForAudio, PrecisionConfigError

HALF = {"bf16-true": torch.bfloat16, "fp16-true": torch.float16, "16-true": torch.float16}


@pytest.mark.parametrize(("precision", "dtype"), HALF.items())
def test_is_lightning_half_precision(precision, dtype):
    plugin = HalfPrecisionForAudio(precision)
    assert isinstance(plugin, HalfPrecision)
    assert plugin.convert_module(torch.nn.Linear(2, 2)).weight.dtype == dtype
    with plugin.forward_context():
        assert torch.get_default_dtype() == dtype
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(("precision", "dtype"), HALF.items())
def test_convert_input_preserves_audio(precision, dtype):
    audio = torch.randn(3)
    out = HalfPrecisionForAudio(precision).convert_input({"audio": audio, "x": torch.randn(3)})
    assert out["audio"] is audio and out["x"].dtype == dtype


def test_preserve_keys_configurable():
    mel = torch.randn(3)
    out = HalfPrecisionForAudio("bf16-true", preserve_keys=["mel"]).convert_input({"mel": mel, "audio": mel})
    assert out["mel"] is mel and out["audio"].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["bf16-mixed", "bf16-flash", "fp32", "bf16"])
def test_rejects_other_precisions_with_the_call(bad):
    with pytest.raises(ValueError, match=rf"HalfPrecisionForAudio\(precision='{bad}'\).*'bf16-true'"):
        HalfPrecisionForAudio(bad)
    assert issubclass(PrecisionConfigError, ValueError)


def test_rejects_bad_on_unsafe():
    with pytest.raises(PrecisionConfigError, match="'sometimes'"):
        HalfPrecisionForAudio("bf16-true", on_unsafe="sometimes")


@pytest.mark.parametrize("spelling, expected", [("False", False), ("true", True), (0, False)])
def test_peft_spellings_are_read_as_booleans(spelling, expected):
    assert HalfPrecisionForAudio("bf16-true", peft=spelling).peft is expected


def test_peft_that_is_not_a_boolean_is_refused():
    with pytest.raises(PrecisionConfigError, match=r"HalfPrecisionForAudio\(peft=...\)='maybe'"):
        HalfPrecisionForAudio("bf16-true", peft="maybe")
