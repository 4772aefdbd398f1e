"""Audio-preserving input casting."""

import dataclasses
from collections import OrderedDict, UserDict, defaultdict, namedtuple

import pytest
import torch

from lightning_precision.casting import cast_batch

HALF = [torch.bfloat16, torch.float16]


class BatchEncodingLike(UserDict):
    """Like HF's BatchEncoding: a UserDict with extra state of its own."""

    def __init__(self, data=None, encodings=None):
        super().__init__(data)
        self.encodings = encodings


Pair = namedtuple("Pair", ["audio_wave", "text"])


@dataclasses.dataclass
class Batch:
    audio: torch.Tensor
    feats: torch.Tensor
    name: str = "b"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    feats: torch.Tensor


@pytest.mark.parametrize("dtype", HALF)
def test_float_cast_and_audio_kept_as_same_object(dtype):
    audio, x = torch.randn(4), torch.randn(4)
    out = cast_batch({"input_audio": audio, "x": x}, dtype)
    assert out["input_audio"] is audio
    assert out["x"].dtype == dtype
    assert torch.equal(out["x"], x.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_preserved_key_protects_everything_below(dtype):
    wav, lengths_f = torch.randn(3), torch.randn(2)
    out = cast_batch({"audio": {"wav": wav, "nested": [lengths_f]}}, dtype)
    assert out["audio"]["wav"] is wav
    assert out["audio"]["nested"][0] is lengths_f


def test_match_is_case_sensitive_substring():
    t = torch.randn(2)
    out = cast_batch({"AUDIO": t, "raw_audio_signal": t}, torch.bfloat16)
    assert out["AUDIO"].dtype == torch.bfloat16
    assert out["raw_audio_signal"] is t


def test_top_level_list_of_dicts():
    a, b = torch.randn(2), torch.randn(2)
    out = cast_batch([{"audio": a, "x": b}, {"audio": a}], torch.bfloat16)
    assert isinstance(out, list)
    assert out[0]["audio"] is a and out[1]["audio"] is a
    assert out[0]["x"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(3), torch.tensor([True, False]), torch.randn(2, dtype=torch.complex64)],
    ids=["int", "bool", "complex"],
)
def test_non_float_tensors_pass_through(tensor):
    out = cast_batch({"t": tensor}, torch.bfloat16)
    assert out["t"] is tensor


def test_non_tensors_and_non_string_keys_pass_through():
    t = torch.randn(2)
    out = cast_batch({1: t, (2, 3): "text", None: None, "n": 5}, torch.bfloat16)
    assert out[1].dtype == torch.bfloat16  # non-string keys are not preserved, but do not crash
    assert out[(2, 3)] == "text" and out[None] is None and out["n"] == 5


@pytest.mark.parametrize(
    "container",
    [OrderedDict, lambda d: defaultdict(list, d), UserDict, lambda d: BatchEncodingLike(d, encodings=["enc"])],
    ids=["OrderedDict", "defaultdict", "UserDict", "BatchEncoding-like"],
)
def test_mapping_types_preserved(container):
    src = container({"x": torch.randn(2), "audio": torch.randn(2)})
    out = cast_batch(src, torch.float16)
    assert type(out) is type(src)
    assert out["x"].dtype == torch.float16 and out["audio"] is src["audio"]
    assert src["x"].dtype == torch.float32  # input not mutated
    if isinstance(src, defaultdict):
        assert out.default_factory is list
    if isinstance(src, BatchEncodingLike):
        assert out.encodings == ["enc"]


def test_namedtuple_fields_act_as_keys():
    wave, text = torch.randn(2), torch.randn(2)
    out = cast_batch(Pair(wave, text), torch.bfloat16)
    assert type(out) is Pair
    assert out.audio_wave is wave and out.text.dtype == torch.bfloat16


def test_dataclass_fields_act_as_keys():
    audio, feats = torch.randn(2), torch.randn(2)
    src = Batch(audio, feats)
    out = cast_batch(src, torch.bfloat16)
    assert type(out) is Batch and out is not src
    assert out.audio is audio and out.feats.dtype == torch.bfloat16 and out.name == "b"
    assert src.feats.dtype == torch.float32


def test_frozen_dataclass():
    out = cast_batch(FrozenBatch(torch.randn(2)), torch.bfloat16)
    assert out.feats.dtype == torch.bfloat16


def test_tuple_and_nothing_to_cast_returns_same_container():
    ids = {"ids": torch.arange(3)}
    assert cast_batch(ids, torch.bfloat16) is ids
    out = cast_batch((torch.randn(2), 1), torch.bfloat16)
    assert isinstance(out, tuple) and out[0].dtype == torch.bfloat16 and out[1] == 1


def test_custom_preserve_keys_and_none():
    t = torch.randn(2)
    assert cast_batch({"mel": t}, torch.bfloat16, preserve_keys=("mel",))["mel"] is t
    assert cast_batch({"mel": t}, torch.bfloat16, preserve_keys="mel")["mel"] is t
    assert cast_batch({"audio": t}, torch.bfloat16, preserve_keys=None)["audio"].dtype == torch.bfloat16


def test_bad_preserve_keys_named():
    with pytest.raises(TypeError, match="preserve_keys"):
        cast_batch({}, torch.bfloat16, preserve_keys=["audio", 3.5])


def test_meta_and_empty_containers():
    out = cast_batch({"m": torch.empty(2, device="meta"), "e": [], "d": {}}, torch.bfloat16)
    assert out["m"].device.type == "meta" and out["m"].dtype == torch.bfloat16
    assert out["e"] == [] and out["d"] == {}


def test_positions_keep_elements_of_a_tuple_batch():
    audio, lengths, feats = torch.randn(2, 16), torch.tensor([16, 12]), torch.randn(2, 4)
    out = cast_batch((audio, lengths, feats), torch.bfloat16, preserve_keys=[0])
    assert out[0] is audio and out[1] is lengths and out[2].dtype == torch.bfloat16
    assert type(out) is tuple


def test_negative_positions_count_from_the_end_of_a_list_batch():
    batch = [torch.randn(2), torch.randn(2)]
    out = cast_batch(batch, torch.bfloat16, preserve_keys=[-1])
    assert out[0].dtype == torch.bfloat16 and out[1] is batch[1] and type(out) is list


def test_positions_and_key_patterns_combine():
    batch = ({"audio_signal": torch.randn(2), "x": torch.randn(2)}, torch.randn(2))
    out = cast_batch(batch, torch.bfloat16, preserve_keys=["audio", 1])
    assert out[0]["audio_signal"].dtype == torch.float32 and out[0]["x"].dtype == torch.bfloat16
    assert out[1] is batch[1]


def test_positions_apply_only_to_the_top_level():
    inner = torch.randn(2)
    out = cast_batch({"pair": (inner, torch.randn(2))}, torch.bfloat16, preserve_keys=[0])
    assert out["pair"][0].dtype == torch.bfloat16
