"""FlashPrecision under Lightning Fabric: flashoptim's cast, no autocast, default dtype untouched, audio kept."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError, PrecisionPairingError, PrecisionWarning
from lightning_precision.fabric import FlashPrecision, check
from lightning_precision.optim import CompensatedAdamW
from tests.fabric.helpers import Net, fabric_with, train

# FlashAdamW without master bits runs on CPU: plain bf16 weights and state, which the rule refuses.
NO_MASTER = {"master_weight_bits": None, "quantize": False, "fused": False}


def test_loop_trains_bf16_without_autocast_and_keeps_audio():
    fabric = fabric_with(FlashPrecision("bf16-flash"))
    net = Net()
    _, optimizer = train(fabric, net, lambda p: CompensatedAdamW(p, lr=1e-2))
    seen = net.seen[0]
    assert (seen["x"], seen["audio"], seen["param"]) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert seen["default"] == torch.float32 and seen["autocast"] is False
    assert optimizer.state[net.net[0].weight]["exp_avg_sq"].dtype == torch.bfloat16  # CompensatedAdamW's default


def test_norm_layers_stay_fp32_through_fabric_setup():
    model = fabric_with(FlashPrecision("bf16-flash")).setup(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert model.module[0].weight.dtype == torch.bfloat16
    assert model.module[1].weight.dtype == torch.float32 and model.module[1].running_mean.dtype == torch.float32


def test_flash_adamw_without_master_weights_is_refused_at_the_first_step():
    from flashoptim import FlashAdamW

    fabric = fabric_with(FlashPrecision("bf16-flash", on_unsafe="error"))
    net = Net()
    with pytest.raises(PrecisionPairingError, match="FlashAdamW"):
        train(fabric, net, lambda p: FlashAdamW(p, lr=1e-2, **NO_MASTER))
    assert len(net.seen) == 1


def test_partly_half_model_is_left_as_handed_over_and_the_contract_says_so(caplog):
    net = Net()
    net.net[0].to(torch.bfloat16)
    fabric = fabric_with(FlashPrecision("bf16-flash"))
    with pytest.warns(PrecisionWarning, match="left as handed over"):
        _, optimizer = fabric.setup(net, CompensatedAdamW(net.parameters()))
    assert (net.net[0].weight.dtype, net.net[2].weight.dtype) == (torch.bfloat16, torch.float32)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        check(fabric, optimizer)
    assert "model dtypes: left as handed over: the model already held non-float32 tensors (2 bfloat16" in caplog.text


def test_bad_precision_and_other_half_dtype_are_refused():
    with pytest.raises(PrecisionConfigError, match=r"FlashPrecision\(precision='bf16-true'\).*'bf16-flash'"):
        FlashPrecision("bf16-true")
    with pytest.raises(PrecisionConfigError, match="fp16-flash.*bfloat16"):
        fabric_with(FlashPrecision("fp16-flash")).setup(nn.Linear(2, 2).to(torch.bfloat16))
