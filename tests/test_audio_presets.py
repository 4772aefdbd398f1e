"""The audio preset table: which front-end modules each preset finds in real models, and the errors when it finds
none."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError
from lightning_precision.audio_presets import (
    AUDIO_PRESETS,
    AudioPresetName,
    find_front_end,
    get_audio_preset,
    suggest_preset,
)
from lightning_precision.casting import holds_preserved
from tests import audio_models

pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e '.[test]')")


def test_the_literal_lists_the_table():
    assert get_args(AudioPresetName) == tuple(AUDIO_PRESETS)


@pytest.mark.parametrize("bad", ["Whisper", "nemo", ""])
def test_an_unknown_preset_names_the_value_and_the_choices(bad):
    with pytest.raises(
        PrecisionConfigError, match=rf"audio_preset: '{bad}' is not .*'whisper', 'wav2vec2', 'nemo_asr'"
    ):
        get_audio_preset(bad)


@pytest.mark.parametrize("bad", [3, ["whisper"], True])
def test_a_preset_that_is_not_a_string_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"audio_preset expects a preset name \('whisper'.*got"):
        get_audio_preset(bad)


def test_no_preset_is_none():
    assert get_audio_preset(None) is None


def test_whisper_keeps_the_two_convolutions_of_its_encoder():
    names = find_front_end(audio_models.whisper(), AUDIO_PRESETS["whisper"])
    assert names == ["model.encoder.conv1", "model.encoder.conv2"]


@pytest.mark.parametrize("model", ["Wav2Vec2ForCTC", "HubertModel", "WavLMModel"])
def test_wav2vec2_keeps_the_feature_encoder_of_the_family(model):
    names = find_front_end(audio_models.wav2vec2(model), AUDIO_PRESETS["wav2vec2"])
    assert names == (["wav2vec2.feature_extractor"] if model == "Wav2Vec2ForCTC" else ["feature_extractor"])


def test_nemo_asr_keeps_the_preprocessor_at_any_depth():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.asr = audio_models.NemoStyleASR()

    preset = AUDIO_PRESETS["nemo_asr"]
    assert find_front_end(audio_models.NemoStyleASR(), preset) == ["preprocessor"]
    assert find_front_end(Wrapper(), preset) == ["asr.preprocessor"]


def test_a_preset_that_finds_nothing_names_what_it_looked_for_and_the_preset_that_fits():
    with pytest.raises(PrecisionConfigError) as err:
        find_front_end(audio_models.wav2vec2(), AUDIO_PRESETS["whisper"])
    message = str(err.value)
    assert "'conv1', 'conv2' of a WhisperEncoder" in message and "Wav2Vec2ForCTC has none" in message
    assert "looks like audio_preset='wav2vec2'" in message


def test_nemo_asr_on_a_model_without_a_preprocessor_is_refused():
    with pytest.raises(PrecisionConfigError, match="a submodule named 'preprocessor'.*Sequential has none"):
        find_front_end(nn.Sequential(nn.Linear(2, 2)), AUDIO_PRESETS["nemo_asr"])


def test_an_owner_missing_a_front_end_module_is_refused():
    model = audio_models.whisper()
    del model.model.encoder.conv2
    with pytest.raises(PrecisionConfigError, match="'model.encoder' \\(WhisperEncoder\\) has no conv2"):
        find_front_end(model, AUDIO_PRESETS["whisper"])


@pytest.mark.parametrize(
    ("batch", "found"),
    [
        ((torch.randn(4), torch.tensor(4)), True),  # NeMo's tuple: position 0
        ([torch.tensor([1, 2]), torch.randn(4)], False),  # position 0 holds integers, not audio
        ({"input_signal": torch.randn(4)}, True),
        ({"inner": {"input_signal": [torch.randn(4)]}}, True),  # any depth
        ({"input_signal": torch.tensor([1])}, False),
        ({"signal": torch.randn(4)}, False),
    ],
)
def test_holds_preserved_looks_for_a_floating_tensor_under_the_keys(batch, found):
    assert holds_preserved(batch, AUDIO_PRESETS["nemo_asr"].input_keys) is found


def test_suggest_preset_names_the_front_end_left_in_half_precision():
    preset, half = suggest_preset(audio_models.whisper(), kept=["model.encoder.conv2"])
    assert (preset.name, half) == ("whisper", ["model.encoder.conv1"])


@pytest.mark.parametrize(
    ("model", "kept"),
    [
        (audio_models.whisper, ["model.encoder"]),  # kept by the user, a level up
        (audio_models.NemoStyleASR, []),  # a module named preprocessor is no proof of NeMo: only the preset says so
        (lambda: nn.Sequential(nn.Conv1d(1, 1, 3)), []),
    ],
)
def test_suggest_preset_says_nothing_when_nothing_is_left_in_half_or_nothing_is_recognised(model, kept):
    assert suggest_preset(model(), kept=kept) is None
