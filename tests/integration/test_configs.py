"""Every YAML in configs/ loads, resolves through resolve_trainer_cfg, and says what the pairing rule says."""

import warnings
from pathlib import Path

import pytest

from lightning_precision import PrecisionWarning, judge, resolve_storage_dtype, resolve_trainer_cfg
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.cli.yaml_loading import load_config, section
from lightning_precision.modes import get_mode
from lightning_precision.pairing import Status

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _sections(path):
    cfg = load_config(path)
    return section(cfg, "trainer"), section(cfg, "model"), section(cfg, "optimizer")


def test_one_config_per_precision_mode():
    precisions = {get_mode(section(load_config(p), "trainer")["precision"]).name for p in CONFIGS}
    assert precisions == {"32-true", "bf16-mixed", "16-mixed", "bf16-true", "bf16-flash", "16-true"}
    assert len([p for p in CONFIGS if "bf16-true" in p.name]) == 2  # the trap and the compensated fix


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_to_what_the_rule_says(path):
    trainer, model, optimizer = _sections(path)
    assert {"data", "model", "optimizer", "trainer"} <= set(load_config(path))
    assert "_target_" in optimizer and "torch_dtype" in model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        kwargs = resolve_trainer_cfg(trainer, model=model, optimizer=optimizer)
    mode = get_mode(trainer["precision"])
    expected = resolve_storage_dtype(model, optimizer, precision=mode)
    assert kwargs.storage_dtype == expected
    assert kwargs.verdict.status == judge(expected, classify_optimizer(optimizer)).status


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_only_the_trap_is_unsafe_and_it_only_warns(path):
    trainer, model, optimizer = _sections(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = resolve_trainer_cfg(trainer, model=model, optimizer=optimizer)
    ours = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    if path.stem == "bf16-true-adamw":
        assert kwargs.verdict.is_unsafe and kwargs.on_unsafe == "warn" and len(ours) == 1
    else:
        assert kwargs.verdict.status is Status.SAFE and not ours
