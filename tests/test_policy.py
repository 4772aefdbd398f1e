"""The on_unsafe policy: one owner per run, explicit policies that disagree are an error, enforcing is its own step."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_precision import (
    HalfPrecisionForAudio,
    PrecisionConfigError,
    PrecisionGuard,
    PrecisionPairingError,
    PrecisionWarning,
    judge,
    plan_trainer_cfg,
    resolve_trainer_cfg,
)
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.pairing import check_optimizer
from lightning_precision.policy import enforce, pairing_error
from tests.helpers import RecordingModule, fit

UNSAFE = judge(torch.bfloat16, classify_optimizer("torch.optim.AdamW"))


def test_plugin_ignore_with_a_default_guard_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        fit(
            RecordingModule(),
            plugins=[HalfPrecisionForAudio("bf16-true", on_unsafe="ignore")],
            callbacks=[PrecisionGuard()],
        )


def test_guard_ignore_with_a_default_plugin_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        fit(
            RecordingModule(),
            plugins=[HalfPrecisionForAudio("bf16-true")],
            callbacks=[PrecisionGuard(on_unsafe="ignore")],
        )


def test_default_plugin_follows_a_guard_set_to_error():
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        fit(
            RecordingModule(),
            plugins=[HalfPrecisionForAudio("bf16-true")],
            callbacks=[PrecisionGuard(on_unsafe="error")],
        )


def test_plugin_error_and_guard_warn_given_explicitly_is_a_config_error_naming_both():
    plugin = HalfPrecisionForAudio("bf16-true", on_unsafe="error")
    with pytest.raises(
        PrecisionConfigError, match=r"HalfPrecisionForAudio\(on_unsafe=\.\.\.\) is 'error'.*PrecisionGuard"
    ):
        fit(RecordingModule(), plugins=[plugin], callbacks=[PrecisionGuard(on_unsafe="warn")])


def test_config_policy_and_a_listed_guard_that_disagree_are_a_config_error():
    cfg = {
        "precision": "bf16-true",
        "lightning_precision": {"on_unsafe": "ignore"},
        "callbacks": [PrecisionGuard(on_unsafe="error")],
    }
    with pytest.raises(PrecisionConfigError, match="trainer.lightning_precision.*'ignore'.*PrecisionGuard.*'error'"):
        resolve_trainer_cfg(cfg)


def test_config_adopts_the_policy_of_a_listed_plugin():
    cfg = {"plugins": [HalfPrecisionForAudio("bf16-true", on_unsafe="error")]}
    with pytest.raises(PrecisionPairingError):
        resolve_trainer_cfg(cfg, model={}, optimizer="torch.optim.AdamW")


def test_components_built_by_the_config_carry_only_an_explicit_policy():
    kwargs = resolve_trainer_cfg({"precision": "bf16-true"}, model={}, optimizer="torch.optim.SGD")
    plugin, guard = kwargs["plugins"][0], kwargs["callbacks"][0]
    assert (plugin.on_unsafe_given, guard.on_unsafe_given, kwargs.on_unsafe) == (None, None, "warn")


def test_plan_judges_without_acting():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = plan_trainer_cfg(
            {"precision": "bf16-true", "lightning_precision": {"on_unsafe": "error"}},
            model={},
            optimizer="torch.optim.AdamW",
        )
    assert kwargs.verdict.is_unsafe and kwargs.on_unsafe == "error"


def test_pairing_error_is_what_enforce_raises():
    error = pairing_error(UNSAFE, "error", where="config")
    with pytest.raises(PrecisionPairingError) as raised:
        enforce(UNSAFE, "error", where="config")
    assert str(raised.value) == str(error)


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_no_pairing_error_unless_error(policy):
    assert pairing_error(UNSAFE, policy) is None


@pytest.mark.parametrize("component", [PrecisionGuard, lambda **kw: HalfPrecisionForAudio("bf16-true", **kw)])
def test_invalid_policy_names_the_value_and_the_choices(component):
    with pytest.raises(PrecisionConfigError, match="'loud'.*warn, error, ignore"):
        component(on_unsafe="loud")


def _bf16_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, PrecisionWarning)]


def test_enforce_warns_once_per_cause():
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    assert len(_record(lambda: [enforce(unsafe) for _ in range(3)])) == 1
    other = judge(torch.float16, classify_optimizer("torch.optim.SGD"))
    assert len(_record(lambda: enforce(other))) == 1  # a different cause warns on its own


def test_enforce_error_and_ignore():
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    with pytest.raises(PrecisionPairingError, match="on_unsafe='error'"):
        enforce(unsafe, "error")
    assert _record(lambda: enforce(unsafe, "ignore")) == []


def test_enforce_warns_only_on_rank_zero(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    unsafe = check_optimizer(torch.optim.AdamW(_bf16_model().parameters()))
    assert _record(lambda: enforce(unsafe)) == []
    with pytest.raises(PrecisionPairingError):  # but every rank refuses
        enforce(unsafe, "error")


@pytest.mark.parametrize("bad", ["warning", "raise", None, True])
def test_enforce_rejects_unknown_policy(bad):
    with pytest.raises(PrecisionConfigError, match="warn, error, ignore"):
        enforce(judge(torch.float32, classify_optimizer("torch.optim.AdamW")), bad)
