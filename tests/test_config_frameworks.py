"""LitGPT's layout and NeMo 2's precision plugin, read without LitGPT or NeMo."""

import pytest
from lightning.pytorch.plugins.precision import Precision

from lightning_precision import PrecisionConfigError
from lightning_precision.config_classes import is_a, option_of
from lightning_precision.config_frameworks import (
    NEMO_PRECISION_PLUGINS,
    is_litgpt,
    nemo_precision_plugin,
    read_litgpt,
    stand_in_note,
)
from lightning_precision.config_layouts import read_run_layout


def test_several_litgpt_devices_are_lightnings_model_parallel_strategy():
    layout = read_run_layout({"precision": "bf16-true", "devices": 4, "num_nodes": 2})
    assert layout.kind == "litgpt" and layout.trainer["devices"] == 4 and layout.trainer["num_nodes"] == 2
    assert layout.trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert layout.trainer["strategy"]["init_args"]["data_parallel_size"] == 8


def test_litgpt_precision_becomes_the_plugin_fabric_builds():
    assert read_litgpt({"precision": "bf16-true"}).trainer["plugins"] == [
        {"class_path": "lightning.pytorch.plugins.precision.HalfPrecision", "init_args": {"precision": "bf16-true"}}
    ]
    plain = read_litgpt({"precision": "32-true", "devices": "auto"})
    assert plain.trainer["plugins"] == [{"class_path": "lightning.pytorch.plugins.precision.Precision"}]
    assert "strategy" not in plain.trainer and "LitGPT uses ModelParallelStrategy" in plain.notes[-2]


@pytest.mark.parametrize(
    ("cfg", "litgpt"),
    [
        ({"precision": "bf16-true"}, True),
        ({"devices": 1, "checkpoint_dir": "c"}, True),
        ({"optimizer": {"_target_": "torch.optim.AdamW"}}, False),  # ours without a trainer: refused as before
        ({"trainer": {}, "precision": "bf16-true"}, False),
        ({"defaults": ["_self_"], "precision": "bf16-true"}, False),
    ],
)
def test_what_is_read_as_litgpt(cfg, litgpt):
    assert is_litgpt(cfg) is litgpt


@pytest.mark.parametrize("path", NEMO_PRECISION_PLUGINS)
def test_nemo2_plugin_is_a_precision_plugin_spec_without_nemo(path):
    spec = nemo_precision_plugin({"_target_": path, "precision": "bf16"}, "trainer.plugins[0]", build=False)
    assert is_a(spec, Precision) and spec.cls.__name__ == "MegatronMixedPrecision"
    assert option_of(spec, "precision") == "bf16-mixed"  # NeMo's reading of "bf16"
    assert path in stand_in_note(spec)
    with pytest.raises(TypeError, match="never built"):
        spec.cls(precision="bf16-mixed")


def test_other_plugin_entries_are_left_to_the_usual_reading():
    entry = {"_target_": "lightning.pytorch.plugins.precision.MixedPrecision", "precision": "bf16-mixed"}
    assert nemo_precision_plugin(entry, "trainer.plugins[0]", build=False) is None
    assert nemo_precision_plugin("nemo.lightning.MegatronMixedPrecision", "trainer.plugins[0]", build=False) is None


def test_nemo2_plugin_init_args_must_be_a_mapping():
    entry = {"class_path": NEMO_PRECISION_PLUGINS[0], "init_args": ["bf16-mixed"]}
    with pytest.raises(PrecisionConfigError, match=r"trainer\.plugins\[0\]\.init_args must be a mapping"):
        nemo_precision_plugin(entry, "trainer.plugins[0]", build=False)
