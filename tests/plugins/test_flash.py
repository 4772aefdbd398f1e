"""FlashPrecision."""

import logging

import pytest
import torch
from torch import nn

from lightning_precision import FlashPrecision, PrecisionConfigError

FLASH = {"bf16-flash": torch.bfloat16, "fp16-flash": torch.float16}


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)


@pytest.mark.parametrize(("precision", "dtype"), FLASH.items())
def test_cast_model_keeps_norm_layers_fp32(precision, dtype):
    model = FlashPrecision(precision).convert_module(WithNorm())
    assert model.lin.weight.dtype == dtype
    assert model.bn.weight.dtype == torch.float32 and model.bn.running_mean.dtype == torch.float32


@pytest.mark.parametrize("precision", FLASH)
def test_never_changes_default_dtype(precision):
    plugin = FlashPrecision(precision)
    for ctx in (plugin.forward_context(), plugin.tensor_init_context(), plugin.module_init_context()):
        with ctx:
            assert torch.get_default_dtype() == torch.float32
            assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError, match="boom"), plugin.forward_context():
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(("precision", "dtype"), FLASH.items())
def test_convert_input_preserves_audio(precision, dtype):
    audio = torch.randn(2)
    out = FlashPrecision(precision).convert_input({"audio_len": audio, "feats": torch.randn(2)})
    assert out["audio_len"] is audio and out["feats"].dtype == dtype


def test_partly_half_model_is_cast_per_tensor(caplog):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].to(torch.bfloat16)
    model[1].register_buffer("scale", torch.ones(1, dtype=torch.bfloat16))  # NeMo would skip the whole model
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        FlashPrecision("bf16-flash").convert_module(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert "cast 2 parameters" in caplog.text and "2 were already" in caplog.text


def test_sharded_parameters_are_left_alone(single_rank_group, caplog):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    fully_shard(model)
    assert isinstance(model[0].weight, DTensor)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        FlashPrecision("bf16-flash").convert_module(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "4 parameters are sharded" in caplog.text


def test_other_half_dtype_is_refused():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(PrecisionConfigError, match="fp16-flash.*bfloat16"):
        FlashPrecision("fp16-flash").convert_module(model)


@pytest.mark.parametrize(("alias", "target"), [("bf16-automodel", "bf16-flash"), ("fp16-automodel", "fp16-flash")])
def test_deprecated_aliases(alias, target):
    with pytest.warns(FutureWarning, match=target):
        assert FlashPrecision(alias).precision == target


@pytest.mark.parametrize("bad", ["bf16-true", "bf16-mixed", "flash"])
def test_rejects_other_precisions_with_the_call(bad):
    with pytest.raises(ValueError, match=rf"FlashPrecision\(precision='{bad}'\).*'bf16-flash', 'fp16-flash'"):
        FlashPrecision(bad)
