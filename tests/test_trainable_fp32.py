"""Trainable parameters kept fp32 under true half precision, on plain models (the PEFT LoRA Llama runs in
tests/plugins/test_half_audio.py and tests/fabric/test_half_audio.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_precision import HalfPrecisionForAudio
from lightning_precision.trainable_fp32 import ADAPTER_FRACTION, trainable_fp32_modules

BF16, FP32 = torch.bfloat16, torch.float32


class AdaptedNet(nn.Module):
    """A frozen base (2 x 64x64) beside a trainable adapter of ``adapter_width`` outputs."""

    def __init__(self, adapter_width: int = 2) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).requires_grad_(False)
        self.adapter = nn.Linear(64, adapter_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)[..., : self.adapter.out_features] + self.adapter(x)


def _fraction(model: nn.Module) -> float:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def test_a_small_trainable_part_is_kept_fp32_and_computes_in_fp32(caplog):
    model = AdaptedNet()
    assert _fraction(model) <= ADAPTER_FRACTION
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        HalfPrecisionForAudio("bf16-true").convert_module(model)
    assert model.adapter.weight.dtype == FP32 and {p.dtype for p in model.base.parameters()} == {BF16}
    assert model(torch.randn(3, 64, dtype=BF16)).dtype == BF16  # the adapter hands its output on in bf16
    assert "of 8,448 parameter elements train" in caplog.text and "('adapter')" in caplog.text


def test_a_large_trainable_part_is_left_to_the_cast_unless_asked():
    assert _fraction(AdaptedNet(adapter_width=32)) > ADAPTER_FRACTION
    model = AdaptedNet(adapter_width=32)
    HalfPrecisionForAudio("bf16-true").convert_module(model)
    assert model.adapter.weight.dtype == BF16
    model = AdaptedNet(adapter_width=32)
    HalfPrecisionForAudio("bf16-true", keep_trainable_fp32=True).convert_module(model)
    assert model.adapter.weight.dtype == FP32


def test_peft_flag_marks_adapter_training_whatever_the_fraction():
    model = AdaptedNet(adapter_width=32)
    HalfPrecisionForAudio("bf16-true", peft=True).convert_module(model)
    assert model.adapter.weight.dtype == FP32 and model.base[0].weight.dtype == BF16


@pytest.mark.parametrize("keep", [None, True])
def test_a_full_fine_tune_keeps_nothing(keep):
    model = AdaptedNet().requires_grad_(True)
    assert trainable_fp32_modules(model, keep).modules == []


def test_option_off_keeps_nothing_even_for_adapters():
    model = AdaptedNet()
    HalfPrecisionForAudio("bf16-true", keep_trainable_fp32=False).convert_module(model)
    assert model.adapter.weight.dtype == BF16


def test_trainable_bias_of_a_frozen_layer_stays_half_and_is_named(caplog):
    model = AdaptedNet()
    model.base[1].bias.requires_grad_(True)  # BitFit: its module holds a frozen weight, so no module can keep it
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        HalfPrecisionForAudio("bf16-true").convert_module(model)
    assert model.base[1].bias.dtype == BF16 and model.adapter.weight.dtype == FP32
    assert "1 trainable parameters stay bfloat16 because their module also holds" in caplog.text
    assert "('base.1.bias')" in caplog.text


def test_user_fp32_modules_still_apply_beside_the_adapters():
    model = AdaptedNet()
    plugin = HalfPrecisionForAudio("bf16-true", fp32_modules=["base.0"])
    plugin.convert_module(model)
    assert model.base[0].weight.dtype == FP32 and model.base[1].weight.dtype == BF16
    assert plugin.fp32_module_names == ("base.0", "adapter")
    trainable, frozen = plugin.parameter_dtypes
    assert trainable == "float32" and set(frozen.split(" / ")) == {"bfloat16", "float32"}  # as many elements each


def test_a_trainable_parameter_tied_into_a_frozen_module_stays_half_instead_of_failing():
    model = AdaptedNet(adapter_width=64)
    model.base[1].weight = model.adapter.weight  # trainable, and shared with a module whose bias is frozen
    decision = trainable_fp32_modules(model, True)
    assert decision.modules == [] and decision.left_in_half == ["base.1.weight", "adapter.weight"]
    HalfPrecisionForAudio("bf16-true", keep_trainable_fp32=True).convert_module(model)
    assert model.adapter.weight.dtype == BF16


def test_trainable_biases_alone_are_reported_as_not_kept(caplog):
    model = AdaptedNet()
    model.adapter.requires_grad_(False)
    model.base[0].bias.requires_grad_(True)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        HalfPrecisionForAudio("bf16-true").convert_module(model)
    assert model.base[0].bias.dtype == BF16
    assert "no module holds only trainable parameters" in caplog.text and "('base.0.bias')" in caplog.text
