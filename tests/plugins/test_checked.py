"""What the plugins share (plugins/_checked.py): ``convert_input`` on awkward batches, and fitting the same module
again in one process (teardown removes what the fit attached)."""

import gc
import os
import weakref

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_precision import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio
from lightning_precision.optim import CompensatedAdamW
from tests.helpers import QUIET_TRAINER, DictDataset, RecordingModule, fit

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


# -- fitting the same module again (issue 23) -------------------------------------------------------------------------

ACCUMULATING = {
    "bf16-true": lambda: HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32"),
    "bf16-flash": lambda: FlashPrecision("bf16-flash", accumulate_grad_dtype="float32", on_unsafe="ignore"),
}


def _compensated(params):
    return CompensatedAdamW(params, lr=1e-2)


def _hooks(module):
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())


def _accumulating_fit(module, plugin, **trainer_kwargs):
    return fit(module, steps=2, plugins=[plugin], accumulate_grad_batches=2, **trainer_kwargs)


@pytest.mark.parametrize("reuse_plugin", [False, True], ids=["new-plugin", "same-plugin"])
@pytest.mark.parametrize("name", ACCUMULATING)
def test_a_refit_trains_bitwise_like_a_first_fit_from_the_same_state(name, reuse_plugin):
    torch.manual_seed(0)
    module = RecordingModule(_compensated)
    plugin = ACCUMULATING[name]()
    _accumulating_fit(module, plugin)
    fresh = RecordingModule(_compensated)
    fresh.load_state_dict(module.state_dict())  # bf16 values into fp32 parameters: exact, and cast back exactly
    _accumulating_fit(module, plugin if reuse_plugin else ACCUMULATING[name]())
    _accumulating_fit(fresh, ACCUMULATING[name]())
    for (param_name, refit), first in zip(module.named_parameters(), fresh.parameters()):
        assert torch.equal(refit, first), param_name


@pytest.mark.parametrize("name", ACCUMULATING)
def test_teardown_removes_the_gradient_hooks(name):
    module = RecordingModule(_compensated)
    plugin = ACCUMULATING[name]()
    _accumulating_fit(module, plugin)
    assert _hooks(module) == 0 and not plugin.grad_accumulator.pending


def _rss_mb():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from Linux /proc")
def test_many_fits_keep_hooks_trainers_and_memory_flat():
    fits, warm_up, data_mb = 16, 4, 8  # a leaking fit keeps its Trainer and so its data set: 8 MB per fit
    rows = int(data_mb * 2**20 / (4 * 17))  # DictDataset: 17 floats per row
    module = RecordingModule(_compensated)
    trainers, hooks, rss = [], [], []
    for _ in range(fits):
        data = DataLoader(DictDataset(n=rows), batch_size=4)
        trainer = pl.Trainer(
            **QUIET_TRAINER, max_steps=2, accumulate_grad_batches=2, plugins=[ACCUMULATING["bf16-true"]()]
        )
        trainer.fit(module, data)
        trainers.append(weakref.ref(trainer))
        del trainer, data
        gc.collect()
        hooks.append(_hooks(module))
        rss.append(_rss_mb())
    assert hooks == [0] * fits
    assert [ref() is None for ref in trainers[:-1]] == [True] * (fits - 1)  # the module keeps its latest Trainer
    growth = rss[-1] - rss[warm_up - 1]
    # Half the leak: the allocator's own noise is a data set or two, the leak one data set per fit.
    assert growth < 0.5 * data_mb * (fits - warm_up), f"RSS grew {growth:.1f} MB over fits {warm_up + 1}..{fits}"
