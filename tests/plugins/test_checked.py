"""What the plugins share (plugins/_checked.py): ``convert_input`` on awkward batches."""

import pytest
import torch

from lightning_precision import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio

PLUGINS = {
    "bf16-true": (lambda: HalfPrecisionForAudio("bf16-true"), torch.bfloat16),
    "16-true": (lambda: HalfPrecisionForAudio("16-true"), torch.float16),
    "bf16-flash": (lambda: FlashPrecision("bf16-flash"), torch.bfloat16),
    "fp16-flash": (lambda: FlashPrecision("fp16-flash"), torch.float16),
    "bf16-mixed": (lambda: CheckedMixedPrecision("bf16-mixed", device="cpu"), None),  # autocast casts, not inputs
}


def _awkward_batch():
    return {
        1: torch.randn(2),  # non-string keys: never preserved, never a crash
        (2, 3): "text",
        None: None,
        "none": None,
        "empty_list": [],
        "empty_dict": {},
        "empty_tuple": (),
        "meta": torch.empty(2, 3, device="meta"),
        "audio_meta": torch.empty(4, device="meta"),
        "ids": torch.arange(3),
        "nested": [None, {}, {5: torch.randn(1)}, ()],
    }


@pytest.mark.parametrize("name", PLUGINS)
def test_convert_input_survives_awkward_batches_and_keeps_types(name):
    make, half = PLUGINS[name]
    batch = _awkward_batch()
    out = make().convert_input(batch)
    assert type(out) is dict and list(out) == list(batch)
    for key in ("none", None):
        assert out[key] is None
    assert out[(2, 3)] == "text"
    for key, kind in (("empty_list", list), ("empty_dict", dict), ("empty_tuple", tuple)):
        assert type(out[key]) is kind and len(out[key]) == 0
    assert (
        type(out["nested"]) is list and out["nested"][0] is None and out["nested"][1] == {} and out["nested"][3] == ()
    )
    assert out["ids"] is batch["ids"]  # integer tensors are never cast
    assert out["audio_meta"] is batch["audio_meta"]  # preserved key
    assert out["meta"].device.type == "meta" and out["meta"].shape == (2, 3)
    expected = half or torch.float32
    assert out["meta"].dtype == expected
    assert out[1].dtype == expected and out["nested"][2][5].dtype == expected
    assert batch[1].dtype == torch.float32 and batch["meta"].dtype == torch.float32  # the input is not mutated
