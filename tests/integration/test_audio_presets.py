"""Audio presets on real speech models built from tiny configs: HF Whisper and Wav2Vec2, and a NeMo-style ASR
module, under the Trainer and Fabric plugins. The audio reaches the model unrounded, the front end is fp32, the rest
bf16, and a step trains. Needs ``transformers`` (a test extra)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from lightning_precision import FlashPrecision, HalfPrecisionForAudio, PrecisionConfigError, PrecisionGuard
from lightning_precision import fabric as lp_fabric
from tests import audio_models
from tests.helpers import QUIET_TRAINER

pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e '.[test]')")


def _fit(module: pl.LightningModule, data: list, preset: str, steps: int = 2) -> pl.Trainer:
    plugin = HalfPrecisionForAudio("bf16-true", audio_preset=preset)
    trainer = pl.Trainer(
        **QUIET_TRAINER, max_steps=steps, plugins=[plugin], callbacks=[PrecisionGuard(on_unsafe="ignore")]
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    return trainer


def _dtypes(module: torch.nn.Module, inside: list[str]) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """The floating dtypes of the parameters and buffers inside the named modules, and of all the others."""
    kept, rest = set(), set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            (kept if any(name.startswith(f"{m}.") for m in inside) else rest).add(tensor.dtype)
    return kept, rest


def test_whisper_trains_with_its_features_and_convolutions_in_fp32():
    data = audio_models.whisper_batches()
    module = audio_models.HFSpeech(audio_models.whisper())
    trainer = _fit(module, data, "whisper")
    front_end = ["model.model.encoder.conv1", "model.model.encoder.conv2"]
    assert _dtypes(module, front_end) == ({torch.float32}, {torch.bfloat16})
    assert torch.equal(
        module.batches[0]["input_features"], torch.stack([data[0]["input_features"], data[1]["input_features"]])
    )
    assert module.batches[0]["input_features"].dtype == torch.float32  # never rounded through bf16
    assert trainer.callbacks[0].contract.fp32_modules == front_end
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_wav2vec2_trains_with_its_waveform_and_feature_encoder_in_fp32():
    module = audio_models.HFSpeech(audio_models.wav2vec2())
    trainer = _fit(module, audio_models.wav2vec2_batches(), "wav2vec2")
    assert _dtypes(module, ["model.wav2vec2.feature_extractor"]) == ({torch.float32}, {torch.bfloat16})
    assert {b["input_values"].dtype for b in module.batches} == {torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_nemo_style_asr_trains_with_its_signal_and_preprocessor_in_fp32():
    module = audio_models.NemoStyleASR()
    trainer = _fit(module, audio_models.nemo_batches(), "nemo_asr")
    assert _dtypes(module, ["preprocessor"]) == ({torch.float32}, {torch.bfloat16})
    assert set(module.signal_dtypes) == {torch.float32}  # tuple position 0
    assert trainer.callbacks[0].contract.fp32_modules == ["preprocessor"]
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_a_second_fit_in_the_same_process_keeps_the_front_end_fp32():
    module = audio_models.HFSpeech(audio_models.whisper())
    _fit(module, audio_models.whisper_batches(), "whisper")
    trainer = _fit(module, audio_models.whisper_batches(), "whisper")
    assert _dtypes(module, ["model.model.encoder.conv1", "model.model.encoder.conv2"]) == (
        {torch.float32},
        {torch.bfloat16},
    )
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_a_first_batch_without_the_presets_keys_stops_the_fit_before_a_step():
    data = [{"features": b["input_features"], "labels": b["labels"]} for b in audio_models.whisper_batches()]
    module = audio_models.HFSpeech(audio_models.whisper())
    with pytest.raises(PrecisionConfigError, match=r"\['input_features'\].*keys \['features', 'labels'\]"):
        _fit(module, data, "whisper")
    assert module.batches == []


def test_a_preset_for_another_model_is_refused_when_the_fit_starts():
    with pytest.raises(
        PrecisionConfigError, match="'feature_extractor' of a Wav2Vec2Model.*looks like audio_preset='whisper'"
    ):
        _fit(audio_models.HFSpeech(audio_models.whisper()), audio_models.whisper_batches(), "wav2vec2")


def test_fabric_whisper_called_with_keywords():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[lp_fabric.HalfPrecisionForAudio(audio_preset="whisper")])
    model = audio_models.whisper()
    seen: list[torch.dtype] = []
    model.model.encoder.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].dtype)
    )  # before the boundary
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    lp_fabric.check(fabric, optimizer, on_unsafe="ignore")
    batch = audio_models.whisper_batches(1)[0]
    loss = model(input_features=batch["input_features"][None], labels=batch["labels"][None]).loss
    fabric.backward(loss)
    optimizer.step()
    assert seen == [torch.float32] and torch.isfinite(loss)
    assert _dtypes(model.module, ["model.encoder.conv1", "model.encoder.conv2"]) == ({torch.float32}, {torch.bfloat16})


def test_fabric_nemo_style_called_with_positional_signal():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[lp_fabric.HalfPrecisionForAudio(audio_preset="nemo_asr")])
    module = audio_models.NemoStyleASR()
    seen: list[torch.dtype] = []
    module.preprocessor.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model = fabric.setup(module)
    signal, length, *_ = (torch.stack(x) for x in zip(*audio_models.nemo_batches(2)))
    log_probs, _ = model(signal, length)
    assert seen == [torch.float32] and torch.isfinite(log_probs).all()
    assert _dtypes(module, ["preprocessor"]) == ({torch.float32}, {torch.bfloat16})


def test_fabric_call_without_the_presets_keys_is_refused():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[lp_fabric.HalfPrecisionForAudio(audio_preset="nemo_asr")])
    model = fabric.setup(audio_models.NemoStyleASR())
    with pytest.raises(PrecisionConfigError, match=r"\['input_signal', 'audio_signal'\] or position \[0\]"):
        model(torch.tensor([320]), torch.randn(1, 320))  # the signal is not first


def test_flash_precision_keeps_the_preset_front_end_fp32():
    model = audio_models.wav2vec2()
    FlashPrecision("bf16-flash", audio_preset="wav2vec2").convert_module(model)
    assert _dtypes(model, ["wav2vec2.feature_extractor"]) == ({torch.float32}, {torch.bfloat16})


def test_without_a_preset_the_plugin_says_once_which_preset_keeps_the_front_end(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        for _ in range(2):
            HalfPrecisionForAudio("bf16-true").convert_module(audio_models.wav2vec2())
    lines = [r.getMessage() for r in caplog.records if "audio_preset=" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("HalfPrecisionForAudio: Wav2Vec2's audio front end (wav2vec2.feature_extractor) runs in")
    assert lines[0].endswith("audio_preset='wav2vec2' keeps both in fp32.")
