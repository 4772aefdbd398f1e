"""Named audio presets: what a speech model family keeps in fp32 under a half precision.

A speech model reads raw audio (or a log-mel spectrogram) through a front end, a feature extractor whose
convolutions, filterbank and window lose signal when the input or their weights are rounded to bf16/fp16. A preset
names, for one family, the batch keys (or tuple positions) holding the audio and the front-end submodules, so that
``HalfPrecisionForAudio(audio_preset="whisper")`` keeps both in fp32 and casts the rest of the model.

Presets are explicit rather than detected: a preset that finds none of its front-end modules in the model, or none
of its keys in the first batch, is an error naming what it looked for, never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lightning_precision.casting import PreserveKey
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import expect_type

AudioPresetName = Literal["whisper", "wav2vec2", "nemo_asr"]


@dataclass(frozen=True)
class AudioPreset:
    """The audio inputs and front end of one model family.

    Attributes:
        name: The ``audio_preset`` value.
        title: The family's short name (for messages).
        family: The models it is for, in words.
        input_keys: Batch key patterns (see :func:`~lightning_precision.casting.cast_batch`) and positions of a tuple
            batch that hold the audio.
        front_end: Names of the front-end submodules, each a child of an owner module.
        owners: Class names of the owner modules (a subclass counts); empty: any module with such a child.
    """

    name: str
    title: str
    family: str
    input_keys: tuple[PreserveKey, ...]
    front_end: tuple[str, ...]
    owners: tuple[str, ...] = ()

    def describe_front_end(self) -> str:
        """The front end looked for, in words (for messages)."""
        children = ", ".join(repr(c) for c in self.front_end)
        if not self.owners:
            return f"a submodule named {children}"
        return f"{children} of a {' / '.join(self.owners)}"


_WAV2VEC2_OWNERS = (
    "Wav2Vec2Model",
    "Wav2Vec2ConformerModel",
    "HubertModel",
    "WavLMModel",
    "Data2VecAudioModel",
    "UniSpeechModel",
    "UniSpeechSatModel",
)

AUDIO_PRESETS: dict[str, AudioPreset] = {
    p.name: p
    for p in (
        # The log-mel input and the two convolutions that read it; the positional embedding and layers are not front end.
        AudioPreset(
            "whisper",
            "Whisper",
            "Hugging Face Whisper (WhisperForConditionalGeneration, WhisperModel, WhisperForAudioClassification)",
            ("input_features",),
            ("conv1", "conv2"),
            ("WhisperEncoder",),
        ),
        # The convolutional feature encoder over the raw waveform. feature_projection is not kept: its input comes
        # out of the kept encoder already in the compute dtype, so fp32 there would only cost memory.
        AudioPreset(
            "wav2vec2",
            "Wav2Vec2",
            "Hugging Face Wav2Vec2 and the models sharing its convolutional feature encoder (Wav2Vec2-Conformer, "
            "HuBERT, WavLM, Data2VecAudio, UniSpeech, UniSpeechSat)",
            ("input_values",),
            ("feature_extractor",),
            _WAV2VEC2_OWNERS,
        ),
        # NeMo's ASR models hold the mel/MFCC preprocessor as `preprocessor`; their batches are
        # (input_signal, input_signal_length, targets, target_length) tuples, or forward(input_signal=...) keywords.
        AudioPreset(
            "nemo_asr",
            "NeMo ASR",
            "NeMo ASR models (EncDecCTCModel, EncDecRNNTModel, ...) and LightningModules built like them",
            (0, "input_signal", "audio_signal"),
            ("preprocessor",),
        ),
    )
}


def get_audio_preset(name: Any, *, what: str = "audio_preset") -> AudioPreset | None:
    """The preset called ``name``; ``None`` for ``None`` (no preset).

    Raises:
        TypeError: If ``name`` is neither a string nor ``None``.
        PrecisionConfigError: If ``name`` is not a preset name; names the valid ones.
    """
    if name is None:
        return None
    if isinstance(name, AudioPreset):
        return name
    expect_type(name, str, what=what, expected=f"a preset name ({', '.join(map(repr, AUDIO_PRESETS))}) or None")
    if name not in AUDIO_PRESETS:
        raise PrecisionConfigError(
            f"{what}: {name!r} is not an audio preset. Valid choices: {', '.join(map(repr, AUDIO_PRESETS))} (or None "
            "for no preset; name other front ends with fp32_modules and their keys with preserve_keys)."
        )
    return AUDIO_PRESETS[name]


def find_front_end(model: nn.Module, preset: AudioPreset) -> list[str]:
    """The qualified names, in ``model``, of the preset's front-end modules, for ``fp32_modules``.

    Raises:
        PrecisionConfigError: If ``model`` holds none of them, or an owner lacks one (a model this preset was not
            written for).
    """
    names: list[str] = []
    for owner_name, owner in model.named_modules():
        if preset.owners and not _is_owner(owner, preset.owners):
            continue
        children = dict(owner.named_children())
        missing = [c for c in preset.front_end if c not in children]
        if preset.owners and missing:
            raise PrecisionConfigError(
                f"audio_preset={preset.name!r} keeps {preset.describe_front_end()} in fp32, but "
                f"{owner_name or type(model).__name__!r} ({type(owner).__name__}) has no {', '.join(missing)}: "
                "this model is not built as the preset expects; name its front end with fp32_modules instead."
            )
        prefix = f"{owner_name}." if owner_name else ""
        names.extend(prefix + c for c in preset.front_end if c in children)
    if not names:
        raise PrecisionConfigError(_nothing_found_message(model, preset))
    return names


def _is_owner(module: nn.Module, owners: tuple[str, ...]) -> bool:
    return any(cls.__name__ in owners for cls in type(module).__mro__)


def _nothing_found_message(model: nn.Module, preset: AudioPreset) -> str:
    fits = [p.name for p in AUDIO_PRESETS.values() if p is not preset and p.owners and _holds(model, p)]
    hint = f" The model looks like audio_preset={fits[0]!r}." if fits else ""
    return (
        f"audio_preset={preset.name!r} ({preset.family}) keeps {preset.describe_front_end()} in fp32, and "
        f"{type(model).__name__} has none: nothing would stay fp32.{hint} For another model, name its front end with "
        "fp32_modules and its audio keys with preserve_keys."
    )


def _holds(model: nn.Module, preset: AudioPreset) -> bool:
    return any(_is_owner(m, preset.owners) for m in model.modules())


def missing_inputs_message(preset: AudioPreset, batch_parts: tuple[Any, ...]) -> str:
    """The error for a first batch that holds no floating-point tensor under the preset's keys."""
    keys = [k for k in preset.input_keys if isinstance(k, str)]
    positions = [k for k in preset.input_keys if isinstance(k, int)]
    looked = f"the batch keys {keys!r}" + (f" or position {positions} of a tuple batch" if positions else "")
    return (
        f"audio_preset={preset.name!r} keeps the audio in fp32 under {looked}, but the first batch has no "
        f"floating-point tensor there ({'; '.join(_shape_of(p) for p in batch_parts)}), so its audio would be cast "
        "to half precision. Add the key holding the audio to preserve_keys and name the front end in fp32_modules "
        "instead of the preset, or pass the audio under the preset's key."
    )


def _shape_of(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)!r}"
    if isinstance(batch, (list, tuple)):
        kinds = [type(v).__name__ if not hasattr(v, "dtype") else str(v.dtype) for v in batch]
        return f"a {type(batch).__name__} of {kinds}"
    return f"a {type(batch).__name__}"


def refused_under_autocast(preset: AudioPreset, precision: str, where: str) -> str:
    """The error for a preset asked for under an autocast (mixed) precision, which cannot keep a front end fp32."""
    return (
        f"{where}.audio_preset={preset.name!r} keeps {preset.describe_front_end()} and the audio in fp32 under a "
        f"true or flash half precision, but precision={precision!r} runs under autocast, which computes the front "
        "end's convolutions and matmuls in half precision whatever their weights: use a '*-true' or '*-flash' "
        "precision with the preset, or drop audio_preset."
    )


def suggest_preset(model: nn.Module, kept: list[str]) -> tuple[AudioPreset, list[str]] | None:
    """A preset whose front end ``model`` holds, recognised by its owner class, with the front-end modules that
    ``kept`` (the fp32 module names) leaves in half precision; ``None`` if there is none. Never decides anything: a
    plugin without a preset only says so."""
    for preset in AUDIO_PRESETS.values():
        if not preset.owners or not _holds(model, preset):
            continue
        try:
            front_end = find_front_end(model, preset)
        except PrecisionConfigError:  # an owner built differently: not this family after all
            continue
        cast = [n for n in front_end if not any(n == k or n.startswith(f"{k}.") for k in kept)]
        if cast:
            return preset, cast
    return None
