"""BatchNorm layers stay fp32 under the half-true and flash plugins (``keep_batchnorm_fp32``, default on)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_precision import FlashPrecision, HalfPrecisionForAudio, PrecisionConfigError, PrecisionGuard
from tests.helpers import QUIET_TRAINER

BF16, FP32 = torch.bfloat16, torch.float32


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)
        )
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).float().squeeze(-1), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _fit(model: pl.LightningModule, plugin: pl.plugins.Precision | None, steps: int = 6) -> pl.Trainer:
    gen = torch.Generator().manual_seed(1)
    data = list(zip(torch.randn(24, 3, 8, 8, generator=gen) * 3 + 2, torch.randn(24, generator=gen)))
    plugins = [plugin] if plugin is not None else []
    trainer = pl.Trainer(
        **QUIET_TRAINER, max_steps=steps, plugins=plugins, callbacks=[PrecisionGuard(on_unsafe="ignore")]
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    return trainer


def _running_stats(model: ConvNet) -> list[torch.Tensor]:
    return [t for m in model.body if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]


def test_batchnorm_stays_fp32_under_bf16_true_and_is_listed_in_the_contract():
    model = ConvNet()
    trainer = _fit(model, HalfPrecisionForAudio("bf16-true"))
    assert {p.dtype for p in model.body[1].parameters()} == {FP32}
    assert all(t.dtype == FP32 for t in _running_stats(model))
    assert model.body[0].weight.dtype == BF16 and model.head.weight.dtype == BF16
    assert trainer.callbacks[0].contract.fp32_modules == ["body.1", "body.4"]


def test_kept_batchnorm_statistics_follow_the_fp32_run_and_half_ones_do_not():
    reference = ConvNet()
    _fit(reference, None)
    kept, cast = ConvNet(), ConvNet()
    _fit(kept, HalfPrecisionForAudio("bf16-true"))
    _fit(cast, HalfPrecisionForAudio("bf16-true", keep_batchnorm_fp32=False))
    assert all(t.dtype == BF16 for t in _running_stats(cast))

    def worst(model: ConvNet) -> float:
        return max(
            ((t.float() - r) / r.abs().clamp_min(1e-3)).abs().max().item()
            for t, r in zip(_running_stats(model), _running_stats(reference))
        )

    assert worst(kept) < worst(cast)


def test_flash_precision_keeps_batchnorm_fp32():
    pytest.importorskip("flashoptim")
    model = copy.deepcopy(ConvNet())
    FlashPrecision("bf16-flash").convert_module(model)
    assert model.body[1].running_var.dtype == FP32 and model.body[1].weight.dtype == FP32


def test_a_model_without_batchnorm_is_unaffected():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    plugin = HalfPrecisionForAudio("bf16-true")
    plugin.convert_module(model)
    assert plugin.fp32_module_names == () and model[0].weight.dtype == BF16


def test_keep_batchnorm_fp32_must_be_a_bool():
    with pytest.raises(PrecisionConfigError, match="keep_batchnorm_fp32"):
        HalfPrecisionForAudio("bf16-true", keep_batchnorm_fp32="false")
