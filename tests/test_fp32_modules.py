"""Submodules kept in fp32 under half precision: a naive speech front end with a mel filterbank buffer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_precision import FlashPrecision, HalfPrecisionForAudio, PrecisionConfigError, PrecisionGuard
from tests.helpers import QUIET_TRAINER

BF16, FP32 = torch.bfloat16, torch.float32


class MelFrontEnd(nn.Module):
    """Frames raw audio and applies a fixed filterbank buffer, as naive speech code does (no dtype handling)."""

    def __init__(self, frame: int = 16, mels: int = 8) -> None:
        super().__init__()
        self.frame = frame
        self.register_buffer("filterbank", torch.rand(mels, frame))
        self.scale = nn.Parameter(torch.ones(mels))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        self.seen_input_dtype = audio.dtype
        self.seen_default_dtype = torch.get_default_dtype()
        frames = audio.unfold(-1, self.frame, self.frame)  # (batch, time, frame)
        return torch.log1p((frames @ self.filterbank.T).abs()) * self.scale


class SpeechModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.frontend = MelFrontEnd()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        features = self.frontend(audio)
        self.seen_feature_dtype = features.dtype
        return self.encoder(features).mean(dim=(1, 2))

    def training_step(self, batch, batch_idx):
        audio, target = (batch["audio"], batch["y"]) if isinstance(batch, dict) else batch
        loss = nn.functional.mse_loss(self(audio).float(), target.float())
        self.log("train_loss", loss, batch_size=len(target))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _loader(kind: str) -> DataLoader:
    audio, y = torch.randn(8, 64), torch.randn(8)
    data = [{"audio": a, "y": t} for a, t in zip(audio, y)] if kind == "dict" else list(zip(audio, y))
    return DataLoader(data, batch_size=4)


def _fit(model: pl.LightningModule, plugin: pl.plugins.Precision, kind: str = "dict") -> pl.Trainer:
    trainer = pl.Trainer(**QUIET_TRAINER, max_steps=2, plugins=[plugin], callbacks=[PrecisionGuard(on_unsafe="ignore")])
    trainer.fit(model, _loader(kind))
    return trainer


def test_naive_front_end_fails_under_bf16_true_without_fp32_modules():
    with pytest.raises(RuntimeError, match="dtype"):
        _fit(SpeechModel(), HalfPrecisionForAudio("bf16-true"))


@pytest.mark.parametrize(("kind", "preserve_keys"), [("dict", ("audio",)), ("tuple", (0,))])
def test_front_end_in_fp32_trains_on_dict_and_tuple_batches(kind, preserve_keys):
    model = SpeechModel()
    plugin = HalfPrecisionForAudio("bf16-true", preserve_keys=preserve_keys, fp32_modules=["frontend"])
    trainer = _fit(model, plugin, kind)
    assert {p.dtype for p in model.frontend.parameters()} == {FP32} and model.frontend.filterbank.dtype == FP32
    assert {p.dtype for p in model.encoder.parameters()} == {BF16}
    assert (model.frontend.seen_input_dtype, model.frontend.seen_default_dtype) == (FP32, FP32)
    assert model.seen_feature_dtype == BF16  # handed on in the compute dtype
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert trainer.callbacks[0].contract.fp32_modules == ["frontend"]


@pytest.mark.parametrize("selector", [MelFrontEnd, "MelFrontEnd", "front*"], ids=["type", "class-name", "pattern"])
def test_selectors_by_type_class_name_and_pattern(selector):
    model = SpeechModel()
    HalfPrecisionForAudio("bf16-true", fp32_modules=selector).convert_module(model)
    assert model.frontend.scale.dtype == FP32 and model.encoder[0].weight.dtype == BF16


def test_kept_module_loaded_in_half_is_upcast_exactly():
    model = SpeechModel().to(BF16)
    before = model.frontend.scale.detach().clone()
    HalfPrecisionForAudio("bf16-true", fp32_modules=["frontend"]).convert_module(model)
    assert model.frontend.scale.dtype == FP32 and torch.equal(model.frontend.scale.to(BF16), before)


def test_selector_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(PrecisionConfigError, match="'frontnd'"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=["frontnd"]).convert_module(SpeechModel())


def test_module_type_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(PrecisionConfigError, match="Conv1d"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=[nn.Conv1d]).convert_module(SpeechModel())


def test_invalid_selector_is_an_error():
    with pytest.raises(PrecisionConfigError, match="fp32_modules"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=[42])


def test_flash_precision_keeps_fp32_modules_too():
    model = SpeechModel()
    FlashPrecision("bf16-flash", fp32_modules=["frontend"]).convert_module(model)
    assert model.frontend.scale.dtype == FP32 and model.frontend.filterbank.dtype == FP32
    assert model.encoder[0].weight.dtype == BF16
    assert model.frontend(torch.randn(2, 32)).dtype == BF16


# -- selecting what stays fp32: names, the root, ties ---------------------------------------------------------------


class WrappedHF(pl.LightningModule):
    """A Hugging Face-style model held as ``self.model``: users write that model's own module names."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"frontend": MelFrontEnd(), "layers": nn.ModuleList([nn.Linear(8, 8)])})


def test_selector_in_the_inner_models_names_is_accepted():
    from lightning_precision.fp32_modules import select_fp32_modules

    assert [n for n, _ in select_fp32_modules(WrappedHF(), ["frontend", "layers.0"])] == [
        "model.frontend",
        "model.layers.0",
    ]


def test_selector_matching_from_the_root_is_not_widened_to_submodules():
    from lightning_precision.fp32_modules import select_fp32_modules

    model = WrappedHF()
    model.frontend = MelFrontEnd()  # a root-level 'frontend' too: the name means that one
    assert [n for n, _ in select_fp32_modules(model, ["frontend"])] == ["frontend"]


def test_selector_that_matches_nothing_names_the_closest_modules():
    with pytest.raises(PrecisionConfigError, match=r"'frontnd': closest 'frontend'"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=["frontnd"]).convert_module(SpeechModel())


@pytest.mark.parametrize("blank", ["", "  "])
def test_empty_name_is_refused_as_naming_the_whole_model(blank):
    with pytest.raises(PrecisionConfigError, match="whole model"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=[blank])


def test_pattern_that_matches_only_the_root_keeps_nothing_and_is_an_error():
    from lightning_precision.fp32_modules import select_fp32_modules

    with pytest.raises(PrecisionConfigError, match="match no submodule"):
        select_fp32_modules(SpeechModel(), ["SpeechModel"])


def test_tied_weight_across_the_fp32_boundary_is_refused_at_setup_naming_both():
    model = SpeechModel()
    model.head = nn.Linear(16, 8, bias=False)
    model.encoder[0].weight = model.head.weight  # (16, 8) both ways: a tie between a kept and a half module
    with pytest.raises(PrecisionConfigError, match=r"'encoder'.*head\.weight"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=["encoder"]).convert_module(model)


def test_a_refit_under_another_half_precision_hands_on_that_precisions_dtype():
    model = SpeechModel()
    HalfPrecisionForAudio("bf16-true", fp32_modules=["frontend"]).convert_module(model)
    HalfPrecisionForAudio("fp16-true", fp32_modules=["frontend"]).convert_module(model)
    assert model.frontend(torch.randn(2, 64)).dtype == torch.float16
    assert len(model.frontend._forward_hooks) == 1  # replaced, not stacked


# -- keeping tensors by name, and names written for an inner model ---------------------------------------------------


class RopeGPT(nn.Module):
    """LitGPT's layout: the rotary tables are buffers on the model root, and the rotation casts back to the input."""

    def __init__(self, dim: int = 8, seq: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        angles = torch.arange(seq)[:, None] * (1e-2 * torch.arange(1, dim + 1))  # small angles bf16 would flatten
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return (x * self.cos + x.roll(1, -1) * self.sin).to(x.dtype)


@pytest.mark.parametrize("plugin_class", [HalfPrecisionForAudio, FlashPrecision])
def test_root_level_buffers_named_in_fp32_modules_stay_fp32_and_the_rest_is_cast(plugin_class):
    model, plugin = RopeGPT(), plugin_class(fp32_modules=["cos", "sin"])
    exact = model.cos.clone()
    plugin.convert_module(model)
    assert (model.cos.dtype, model.sin.dtype, model.proj.weight.dtype) == (FP32, FP32, BF16)
    assert torch.equal(model.cos, exact) and plugin.fp32_module_names == ("cos", "sin")
    assert model(torch.randn(4, 8, dtype=BF16)).dtype == BF16


def test_tensor_names_of_an_inner_model_and_a_refit_keep_them_fp32():
    holder = pl.LightningModule()
    holder.model = RopeGPT()
    for _ in range(2):
        plugin = HalfPrecisionForAudio("bf16-true", fp32_modules=["cos"])
        plugin.convert_module(holder)
    assert holder.model.cos.dtype == FP32 and holder.model.sin.dtype == BF16
    assert plugin.fp32_module_names == ("model.cos",)


def test_a_tensor_name_with_a_typo_names_the_closest_tensor():
    with pytest.raises(PrecisionConfigError, match=r"'coss': closest 'cos'"):
        HalfPrecisionForAudio("bf16-true", fp32_modules=["coss"]).convert_module(RopeGPT())


def test_tensor_names_are_refused_where_only_modules_can_be_kept():
    from lightning_precision.fp32_modules import select_fp32_modules

    with pytest.raises(PrecisionConfigError, match=r"names the tensors \['cos'\].*name the module that holds them"):
        select_fp32_modules(RopeGPT(), ["cos"])


class EncoderDecoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict(
            {side: nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(8, 8)])}) for side in ("encoder", "decoder")}
        )


def test_a_name_matching_under_two_submodules_is_refused_naming_both():
    with pytest.raises(
        PrecisionConfigError, match=r"'layers.0' matches under two submodules: 'model.encoder'.*'model.decoder'"
    ):
        HalfPrecisionForAudio("bf16-true", fp32_modules=["layers.0"]).convert_module(EncoderDecoder())


@pytest.mark.parametrize(
    ("selector", "kept"),
    [
        ("model.encoder.layers.0", ["model.encoder.layers.0"]),  # the LightningModule's names
        ("encoder.layers.0", ["model.encoder.layers.0"]),  # the inner model's names
        ("encoder.layers.*", ["model.encoder.layers.0"]),  # a pattern in the inner model's names
        ("*.layers.0", ["model.encoder.layers.0", "model.decoder.layers.0"]),  # a pattern meant for both
    ],
)
def test_names_and_patterns_from_the_root_or_the_inner_model(selector, kept):
    from lightning_precision.fp32_modules import select_fp32_modules

    assert [n for n, _ in select_fp32_modules(EncoderDecoder(), [selector])] == kept


class TimestepEmbedding(nn.Module):
    """diffusers' shape: the caller passes the dtype the embedding should compute in (``hidden_dtype``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, timesteps: torch.Tensor, hidden_dtype: torch.dtype) -> torch.Tensor:
        self.seen_dtype = timesteps.to(hidden_dtype).dtype
        return self.linear(timesteps.to(hidden_dtype))


def test_a_kept_module_given_a_half_dtype_argument_computes_in_fp32():
    model = nn.Sequential(TimestepEmbedding(), nn.Linear(8, 8))
    HalfPrecisionForAudio("bf16-true", fp32_modules=[TimestepEmbedding]).convert_module(model)
    out = model[0](torch.randn(2, 8, dtype=BF16), hidden_dtype=BF16)
    assert model[0].seen_dtype == FP32 and out.dtype == BF16
