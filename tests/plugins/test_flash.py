"""FlashPrecision."""

import logging

import pytest
import torch
from torch import nn

from lightning_precision import FlashPrecision, PrecisionConfigError, PrecisionWarning

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


def test_float32_model_is_cast_and_the_plugin_says_so():
    plugin = FlashPrecision("bf16-flash")
    model = plugin.convert_module(WithNorm())
    assert model.lin.weight.dtype == torch.bfloat16
    assert plugin.model_cast == "float32 model cast to bfloat16 (2 parameters; 2 kept in float32)"


def test_partly_half_model_is_left_as_handed_over_with_a_warning():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].to(torch.bfloat16)  # the user chose bf16 for this layer only
    plugin = FlashPrecision("bf16-flash")
    with pytest.warns(PrecisionWarning, match=r"2 parameters therefore stay float32.*'1.weight'"):
        plugin.convert_module(model)
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert plugin.model_cast.startswith("left as handed over") and "2 bfloat16" in plugin.model_cast


def test_float64_buffer_is_not_cast():
    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.ones(3, dtype=torch.float64))
    with pytest.warns(PrecisionWarning, match="1 float64"):
        FlashPrecision("bf16-flash").convert_module(model)
    assert model.table.dtype == torch.float64 and model.weight.dtype == torch.float32


def test_bf16_buffer_is_not_turned_into_fp16():
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.ones(1, dtype=torch.bfloat16))
    with pytest.warns(PrecisionWarning, match="not float16"):
        FlashPrecision("fp16-flash").convert_module(model)
    assert model.scale.dtype == torch.bfloat16


def test_model_loaded_in_the_half_dtype_is_left_quietly_except_its_fp32_modules(recwarn, caplog):
    model = WithNorm().to(torch.bfloat16)
    plugin = FlashPrecision("bf16-flash", fp32_modules=["lin"], keep_batchnorm_fp32=False)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        plugin.convert_module(model)
    assert model.lin.weight.dtype == torch.float32  # asked for explicitly: upcast exactly
    assert model.bn.weight.dtype == torch.bfloat16 and model.bn.running_mean.dtype == torch.bfloat16
    assert not [w for w in recwarn if issubclass(w.category, PrecisionWarning)]
    assert "left as handed over" in caplog.text


def test_integer_parameter_is_not_cast():
    model = nn.Linear(2, 2)
    model.ids = nn.Parameter(torch.arange(3), requires_grad=False)
    FlashPrecision("bf16-flash").convert_module(model)
    assert model.ids.dtype == torch.int64 and model.weight.dtype == torch.bfloat16


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


class WithInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.head = nn.Linear(4, 1)


def test_modules_flashoptim_keeps_fp32_are_listed_for_the_contract():
    plugin = FlashPrecision("bf16-flash", cast_model_kwargs={"full_precision_layers": ["head"]})
    model = plugin.convert_module(WithInstanceNorm())
    assert (model.inorm.weight.dtype, model.head.weight.dtype) == (torch.float32, torch.float32)
    assert plugin.fp32_module_names == ("inorm (flashoptim.cast_model)", "head (flashoptim.cast_model)")


def test_batchnorm_kept_by_both_is_listed_once_and_stays_fp32_when_only_flashoptim_keeps_it():
    ours = FlashPrecision("bf16-flash")
    ours.convert_module(WithNorm())
    assert ours.fp32_module_names == ("bn",)
    theirs = FlashPrecision("bf16-flash", keep_batchnorm_fp32=False)
    model = theirs.convert_module(WithNorm())
    assert model.bn.weight.dtype == torch.float32  # flashoptim.cast_model(selective=True) keeps it
    assert theirs.fp32_module_names == ("bn (flashoptim.cast_model)",)


def test_second_fit_of_a_model_cast_before_is_quiet_and_keeps_the_list(recwarn):
    model = WithInstanceNorm()
    FlashPrecision("bf16-flash").convert_module(model)
    again = FlashPrecision("bf16-flash")
    again.convert_module(model)
    assert not [w for w in recwarn if issubclass(w.category, PrecisionWarning)]
    assert again.model_cast.startswith("cast to bfloat16 by FlashPrecision before")
    assert again.fp32_module_names == ("inorm (flashoptim.cast_model)",)
    assert model.lin.weight.dtype == torch.bfloat16 and model.inorm.weight.dtype == torch.float32
