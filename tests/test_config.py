"""resolve_trainer_cfg: YAML/OmegaConf trainer config to pl.Trainer kwargs."""

import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from omegaconf import OmegaConf

from lightning_precision import (
    AtomicCheckpointIO,
    FlashPrecision,
    HalfPrecisionForAudio,
    PrecisionConfigError,
    PrecisionGuard,
    PrecisionPairingError,
    PrecisionWarning,
    Status,
    plan_trainer_cfg,
    resolve_trainer_cfg,
)
from tests.helpers import RecordingModule, loader

ADAMW = {"_target_": "torch.optim.AdamW", "lr": 1e-3}
FLASH = {"_target_": "flashoptim.FlashAdamW", "lr": 1e-3}


def _precision_plugins(kwargs):
    return [p for p in kwargs.get("plugins", []) if isinstance(p, HalfPrecision | FlashPrecision)]


@pytest.mark.parametrize(
    ("precision", "plugin_cls", "canonical"),
    [
        ("bf16-true", HalfPrecisionForAudio, "bf16-true"),
        ("fp16-true", HalfPrecisionForAudio, "16-true"),
        ("16-true", HalfPrecisionForAudio, "16-true"),
        ("bf16-flash", FlashPrecision, "bf16-flash"),
        ("fp16-flash", FlashPrecision, "fp16-flash"),
    ],
)
def test_true_and_flash_strings_become_plugins(precision, plugin_cls, canonical):
    kwargs = resolve_trainer_cfg({"precision": precision, "max_steps": 2})
    assert "precision" not in kwargs
    (plugin,) = _precision_plugins(kwargs)
    assert type(plugin) is plugin_cls and plugin.precision == canonical
    assert kwargs["max_steps"] == 2


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true", "32", "16", "bf16", "64-true"])
def test_lightning_strings_pass_through(precision):
    kwargs = resolve_trainer_cfg({"precision": precision})
    assert kwargs["precision"] == precision
    assert [type(p) for p in kwargs["plugins"]] == [AtomicCheckpointIO]  # no precision plugin, only the atomic saver


def test_lightning_strings_build_a_real_trainer():
    trainer = pl.Trainer(**resolve_trainer_cfg({"precision": "bf16-mixed", "accelerator": "cpu", "logger": False}))
    assert isinstance(trainer.precision_plugin, MixedPrecision)


def test_plugin_is_added_to_existing_plugins():
    from lightning.pytorch.plugins.environments import LightningEnvironment

    env = LightningEnvironment()
    kwargs = resolve_trainer_cfg({"precision": "bf16-true", "plugins": [env]})
    assert kwargs["plugins"][0] is env and isinstance(kwargs["plugins"][1], HalfPrecisionForAudio)


def test_single_plugin_object_is_accepted():
    kwargs = resolve_trainer_cfg({"plugins": {"_target_": "lightning_precision.HalfPrecisionForAudio"}})
    assert isinstance(kwargs["plugins"][0], HalfPrecisionForAudio)
    assert kwargs.precision_mode.name == "bf16-true"


def test_precision_string_plus_precision_plugin_is_an_error():
    cfg = {"precision": "bf16-true", "plugins": [HalfPrecisionForAudio("bf16-true")]}
    with pytest.raises(PrecisionConfigError, match="both set the precision"):
        resolve_trainer_cfg(cfg)


def test_two_precision_plugins_are_an_error():
    with pytest.raises(PrecisionConfigError, match="2 precision plugins"):
        resolve_trainer_cfg({"plugins": [HalfPrecisionForAudio(), FlashPrecision()]})


def test_unknown_precision_is_an_error():
    with pytest.raises(PrecisionConfigError, match="'bf16-fast'.*Valid choices"):
        resolve_trainer_cfg({"precision": "bf16-fast"})


def test_targets_instantiated_in_plugins_callbacks_strategy():
    cfg = {
        "plugins": [{"_target_": "lightning_precision.FlashPrecision", "precision": "fp16-flash"}],
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}],
        "strategy": {"_target_": "lightning.pytorch.strategies.SingleDeviceStrategy", "device": "cpu"},
    }
    kwargs = resolve_trainer_cfg(cfg)
    assert isinstance(kwargs["plugins"][0], FlashPrecision) and kwargs["plugins"][0].precision == "fp16-flash"
    assert isinstance(kwargs["callbacks"][0], LearningRateMonitor)
    assert isinstance(kwargs["strategy"], pl.strategies.SingleDeviceStrategy)


def test_target_that_does_not_import_names_the_entry():
    with pytest.raises(PrecisionConfigError, match=r"trainer.callbacks\[0\].*no_such_pkg.Callback"):
        resolve_trainer_cfg({"callbacks": [{"_target_": "no_such_pkg.Callback"}]})


def test_unregistered_strategy_name_lists_registered():
    with pytest.raises(PrecisionConfigError, match="'nope'.*Registered"):
        resolve_trainer_cfg({"strategy": {"name": "nope"}})


def test_guard_added_once_and_user_guard_kept():
    assert sum(isinstance(c, PrecisionGuard) for c in resolve_trainer_cfg({})["callbacks"]) == 1
    mine = PrecisionGuard(on_unsafe="ignore")
    assert resolve_trainer_cfg({"callbacks": [mine]})["callbacks"] == [mine]


def test_omegaconf_interpolation_struct_and_no_mutation():
    cfg = OmegaConf.create({"run": {"steps": 7}, "trainer": {"max_steps": "${run.steps}", "precision": "bf16-true"}})
    OmegaConf.set_struct(cfg, True)
    before = OmegaConf.to_container(cfg)
    kwargs = resolve_trainer_cfg(cfg.trainer)
    assert kwargs["max_steps"] == 7 and isinstance(kwargs, dict)
    assert OmegaConf.to_container(cfg) == before


def test_plain_dict_input_not_mutated():
    cfg = {"precision": "bf16-flash", "plugins": [], "callbacks": [], "lightning_precision": {"on_unsafe": "ignore"}}
    snapshot = copy.deepcopy(cfg)
    resolve_trainer_cfg(cfg)
    assert cfg == snapshot


def test_config_alone_shows_unsafe_pairing_under_error():
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        resolve_trainer_cfg({"precision": "bf16-true"}, model={}, optimizer=ADAMW, on_unsafe="error")


def test_on_unsafe_from_yaml_key_lightning_never_sees():
    cfg = {"precision": "bf16-true", "lightning_precision": {"on_unsafe": "error"}}
    with pytest.raises(PrecisionPairingError):
        resolve_trainer_cfg(cfg, model={}, optimizer=ADAMW)
    kwargs = resolve_trainer_cfg({**cfg, "lightning_precision": {"on_unsafe": "ignore"}}, model={}, optimizer=ADAMW)
    assert "lightning_precision" not in kwargs and kwargs.on_unsafe == "ignore"


def test_config_unsafe_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            resolve_trainer_cfg({"precision": "bf16-true"}, model={}, optimizer=ADAMW)
    assert sum(issubclass(w.category, PrecisionWarning) for w in caught) == 1


@pytest.mark.parametrize(
    ("trainer", "model", "optimizer", "storage", "status"),
    [
        ({"precision": "bf16-mixed"}, {"torch_dtype": "auto"}, ADAMW, torch.float32, Status.SAFE),
        ({"precision": "bf16-mixed"}, {"torch_dtype": "bf16"}, ADAMW, torch.bfloat16, Status.UNSAFE),
        ({"precision": "bf16-flash"}, {}, FLASH, torch.bfloat16, Status.SAFE),
        ({"precision": "bf16-mixed"}, {}, FLASH, torch.bfloat16, Status.SAFE),
        ({"precision": "bf16-true"}, {}, ADAMW, torch.bfloat16, Status.UNSAFE),
    ],
)
def test_storage_dtype_resolved_and_judged(trainer, model, optimizer, storage, status):
    kwargs = resolve_trainer_cfg(trainer, model=model, optimizer=optimizer, on_unsafe="ignore")
    assert kwargs.storage_dtype == storage and kwargs.verdict.status is status


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"lightning_precision": {"on_unsafe": "loud"}}, "'loud'.*warn, error, ignore"),
        ({"lightning_precision": {"onunsafe": "warn"}}, "onunsafe.*Valid options"),
        ({"lightning_precision": "error"}, "must be a mapping"),
    ],
)
def test_bad_options_are_named(cfg, match):
    with pytest.raises(PrecisionConfigError, match=match):
        resolve_trainer_cfg(cfg)


def test_missing_trainer_section():
    with pytest.raises(PrecisionConfigError, match="trainer section is missing"):
        resolve_trainer_cfg(OmegaConf.create({"model": {}}).get("trainer"))


def test_bad_torch_dtype_is_named():
    with pytest.raises(PrecisionConfigError, match="model.torch_dtype='bf17'"):
        resolve_trainer_cfg({}, model={"torch_dtype": "bf17"}, optimizer=ADAMW)


def test_resolved_kwargs_fit_like_nemo():
    cfg = OmegaConf.create(
        {
            "trainer": {
                "precision": "bf16-true",
                "accelerator": "cpu",
                "max_steps": 2,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "lightning_precision": {"on_unsafe": "ignore"},
            }
        }
    )
    module = RecordingModule()
    pl.Trainer(**resolve_trainer_cfg(cfg.trainer)).fit(module, loader())
    assert module.seen[-1]["param"] == torch.bfloat16 and module.seen[-1]["audio"] == torch.float32


def test_bf16_flash_with_a_torch_optimizer_warns_naming_the_optimizer_and_both_fixes():
    with pytest.warns(PrecisionWarning) as caught:
        kwargs = resolve_trainer_cfg({"precision": "bf16-flash"}, model={}, optimizer=ADAMW)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    assert kwargs.verdict.status is Status.UNSAFE and kwargs.storage_dtype == torch.bfloat16
    assert message.startswith("[config] ") and "torch.optim.adamw.AdamW" in message
    fix_fp32, fix_half = kwargs.verdict.fixes
    assert f"(1) {fix_fp32}" in message and f"(2) {fix_half}" in message
    assert "precision='bf16-mixed'" in fix_fp32 and "FlashAdamW(master_weight_bits=24)" in fix_half


def test_bf16_flash_with_a_torch_optimizer_raises_under_error():
    cfg = {"precision": "bf16-flash", "lightning_precision": {"on_unsafe": "error"}}
    with pytest.raises(PrecisionPairingError, match=r"torch\.optim\.adamw\.AdamW.*\(1\).*\(2\).*on_unsafe='error'"):
        resolve_trainer_cfg(cfg, model={}, optimizer=ADAMW)


def test_fp16_flash_with_bf16_torch_dtype_names_value_precision_and_choices():
    with pytest.raises(PrecisionConfigError) as err:
        resolve_trainer_cfg({"precision": "fp16-flash"}, model={"torch_dtype": "bf16"}, optimizer=FLASH)
    message = str(err.value)
    assert "model.torch_dtype=bfloat16" in message and "precision='fp16-flash'" in message
    assert "torch_dtype: float16 or auto" in message


@pytest.mark.parametrize("as_list", [False, True], ids=["single object", "list"])
def test_plugins_as_a_single_object_or_a_list(as_list):
    plugin = HalfPrecisionForAudio("bf16-true", on_unsafe="ignore")
    kwargs = resolve_trainer_cfg({"plugins": [plugin] if as_list else plugin, "accelerator": "cpu", "logger": False})
    assert kwargs["plugins"][0] is plugin and kwargs.precision_mode.name == "bf16-true"
    assert pl.Trainer(**kwargs).precision_plugin is plugin


@pytest.mark.parametrize("target", ["torch.optim.AdamWW", "lightning_precision.optim.CompensatedAdamw"])
def test_optimizer_target_that_does_not_import_is_a_config_error(target):
    with pytest.raises(PrecisionConfigError, match=target.replace(".", r"\.")):
        resolve_trainer_cfg({"precision": "bf16-true"}, model={}, optimizer={"_target_": target, "lr": 1e-3})


def test_optimizer_of_a_package_not_installed_is_still_classified_by_path():
    kwargs = resolve_trainer_cfg(
        {"precision": "bf16-true"},
        model={},
        optimizer={"_target_": "transformer_engine.pytorch.optimizers.FusedAdam", "master_weights": True},
    )
    assert kwargs.verdict.status is Status.SAFE


@pytest.mark.parametrize("spelling", ["False", "false", "no", "off", "0", 0, False])
def test_peft_false_spellings_keep_the_check_on(spelling):
    cfg = OmegaConf.create({"precision": "bf16-true", "lightning_precision": {"on_unsafe": "error", "peft": spelling}})
    with pytest.raises(PrecisionPairingError):
        resolve_trainer_cfg(cfg, model={}, optimizer={"_target_": "torch.optim.AdamW"})


@pytest.mark.parametrize("spelling", ["True", "yes", "1", 1, True])
def test_peft_true_spellings_leave_storage_to_the_model(spelling):
    cfg = {"precision": "bf16-mixed", "lightning_precision": {"on_unsafe": "error", "peft": spelling}}
    kwargs = resolve_trainer_cfg(cfg, model={}, optimizer={"_target_": "torch.optim.AdamW"})
    assert kwargs.storage_dtype is None and kwargs.verdict.status is Status.NOT_JUDGED


@pytest.mark.parametrize("bad", ["maybe", "", 2, 0.5])
def test_peft_that_is_not_a_boolean_is_a_config_error(bad):
    with pytest.raises(PrecisionConfigError, match="peft"):
        resolve_trainer_cfg({"precision": "bf16-true", "lightning_precision": {"peft": bad}})


def test_env_interpolated_peft_string_is_read_as_false(monkeypatch):
    monkeypatch.setenv("LP_TEST_PEFT", "false")
    cfg = OmegaConf.create(
        {"precision": "bf16-true", "lightning_precision": {"on_unsafe": "error", "peft": "${oc.env:LP_TEST_PEFT,true}"}}
    )
    with pytest.raises(PrecisionPairingError):
        resolve_trainer_cfg(cfg, model={}, optimizer={"_target_": "torch.optim.AdamW"})


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16"])
def test_lightning_precision_the_library_does_not_model_passes_through(precision):
    kwargs = resolve_trainer_cfg({"precision": precision}, model={}, optimizer=ADAMW)
    assert kwargs["precision"] == precision
    assert kwargs.precision_mode is None
    assert _precision_plugins(kwargs) == []


def test_unknown_precision_error_lists_the_pass_through_precisions():
    with pytest.raises(PrecisionConfigError, match="transformer-engine"):
        resolve_trainer_cfg({"precision": "bf16-fast"})


def test_a_nested_hydra_target_that_is_not_a_class_is_refused_before_anything_is_built(tmp_path):
    marker = tmp_path / "marker"
    cfg = {
        "callbacks": [
            {
                "_target_": "tests.cli.untrusted_helpers.WritesOnInit",
                "path": {"_target_": "os.system", "command": f"touch {marker}"},
            }
        ]
    }
    with pytest.raises(PrecisionConfigError, match=r"trainer.callbacks\[0\].path._target_='os.system'.*not a class"):
        resolve_trainer_cfg(cfg)
    assert not marker.exists()


def test_a_class_path_argument_the_class_does_not_take_is_a_config_error():
    cfg = {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"nope": 1}}]}
    with pytest.raises(PrecisionConfigError, match=r"trainer.callbacks\[0\]: LearningRateMonitor .*nope"):
        resolve_trainer_cfg(cfg)


def test_plan_without_building_reads_entries_as_class_specs(tmp_path):
    from lightning_precision.config_classes import ClassSpec
    from tests.cli.untrusted_helpers import WritesOnInit

    marker = tmp_path / "marker"
    entry = {"class_path": "tests.cli.untrusted_helpers.WritesOnInit", "init_args": {"path": str(marker)}}
    cfg = {"callbacks": [entry]}
    kwargs = plan_trainer_cfg(cfg, build=False)
    assert kwargs["callbacks"][0] == ClassSpec(WritesOnInit, {"path": str(marker)}, "trainer.callbacks[0]")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("version", "strategy", "precision", "warned"),
    [
        ("2.6.1", "fsdp", "bf16-mixed", True),
        ("2.6.0", {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "16-mixed", True),
        ("2.6.2", "fsdp", "bf16-mixed", False),  # fixed release
        ("2.6.1", "ddp", "bf16-mixed", False),  # not FSDP
        ("2.6.1", "fsdp", "bf16-true", False),  # no fp32 storage promised
    ],
)
def test_lightning_fsdp_mixed_init_fault_is_warned_naming_the_version(
    monkeypatch, version, strategy, precision, warned
):
    import warnings

    from packaging.version import Version

    from lightning_precision import PrecisionWarning, upstream

    monkeypatch.setattr(upstream, "installed_version", lambda package: Version(version))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = resolve_trainer_cfg({"strategy": strategy, "precision": precision})
    faults = [
        str(w.message) for w in caught if issubclass(w.category, PrecisionWarning) and "known fault" in str(w.message)
    ]
    assert bool(faults) is warned and bool(kwargs.upstream_faults) is warned
    if warned:
        assert f"lightning {version}" in faults[0] and "lightning>=2.6.2" in faults[0]


@pytest.mark.parametrize("key", ["callbacks", "plugins"])
def test_a_null_callback_or_plugin_entry_is_refused_naming_it(key):
    with pytest.raises(PrecisionConfigError, match=rf"trainer\.{key}\[0\] is null"):
        resolve_trainer_cfg({"precision": "bf16-mixed", key: [None]})


@pytest.mark.parametrize(
    ("init_args", "fragment"),
    [
        ({"lr": -1}, "Invalid lr: -1"),
        ({"exp_avg_dtype": "float64"}, "Invalid exp_avg_dtype: 'float64'"),
        ({"lrr": 1e-3}, "does not take.*'lrr'"),
        ({"exp_avg_sq_rounding": "stochastic", "exp_avg_sq_dtype": "fp32"}, "exp_avg_sq_dtype is 'float32'"),
        ({"exp_avg_rounding": "sometimes"}, "'sometimes'.*'auto', 'nearest', 'stochastic'"),
        ({"maximize": "false"}, "maximize"),
    ],
)
def test_invalid_compensated_adamw_options_in_a_config_are_refused_before_anything_runs(init_args, fragment):
    optimizer = {"class_path": "lightning_precision.optim.CompensatedAdamW", "init_args": init_args}
    with pytest.raises(PrecisionConfigError, match=fragment):
        resolve_trainer_cfg({"precision": "bf16-true"}, optimizer=optimizer)


@pytest.mark.parametrize(
    ("keys", "error"),
    [(b"audio", TypeError), ("", ValueError), (["mel", ""], ValueError), ([["mel"]], TypeError), ({"a": 1}, TypeError)],
)
def test_bad_preserve_keys_option_is_refused_naming_the_value(keys, error):
    cfg = {"precision": "bf16-true", "lightning_precision": {"preserve_keys": keys}}
    with pytest.raises(error, match="preserve_keys"):
        resolve_trainer_cfg(cfg)


def test_preserve_keys_option_ignored_by_a_given_plugin_is_refused():
    cfg = {"plugins": [HalfPrecision("bf16-true")], "lightning_precision": {"preserve_keys": ["mel"]}}
    with pytest.raises(PrecisionConfigError, match=r"preserve_keys=\['mel'\].*pass preserve_keys to your precision"):
        resolve_trainer_cfg(cfg)


@pytest.mark.parametrize(
    ("precision", "plugin_cls"), [("bf16-true", HalfPrecisionForAudio), ("bf16-flash", FlashPrecision)]
)
def test_audio_preset_option_reaches_the_plugin_built_from_the_precision(precision, plugin_cls):
    cfg = OmegaConf.create({"precision": precision, "lightning_precision": {"audio_preset": "nemo_asr"}})
    (plugin,) = _precision_plugins(resolve_trainer_cfg(cfg))
    assert isinstance(plugin, plugin_cls) and plugin.audio_preset.name == "nemo_asr"
    assert plugin.preserve_keys == ("audio", 0, "input_signal", "audio_signal")
    (spec,) = [p for p in plan_trainer_cfg(cfg, build=False)["plugins"] if p.cls is plugin_cls]
    assert spec.init_args["audio_preset"] == "nemo_asr"  # explain reads the same plugin


def test_an_unknown_audio_preset_option_is_refused_even_by_explain():
    cfg = {"precision": "bf16-true", "lightning_precision": {"audio_preset": "whisper-large"}}
    with pytest.raises(
        PrecisionConfigError, match=r"trainer.lightning_precision.audio_preset: 'whisper-large'.*'whisper'"
    ):
        plan_trainer_cfg(cfg, build=False)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_audio_preset_under_autocast_is_refused(precision):
    cfg = {"precision": precision, "lightning_precision": {"audio_preset": "whisper"}}
    with pytest.raises(
        PrecisionConfigError, match=rf"audio_preset='whisper'.*precision='{precision}' runs under autocast"
    ):
        resolve_trainer_cfg(cfg)


def test_audio_preset_option_ignored_by_a_given_plugin_is_refused():
    cfg = {"plugins": [HalfPrecision("bf16-true")], "lightning_precision": {"audio_preset": "whisper"}}
    with pytest.raises(PrecisionConfigError, match=r"audio_preset='whisper'.*pass audio_preset to your precision"):
        resolve_trainer_cfg(cfg)


def test_a_callback_whose_constructor_raises_is_a_config_error_naming_it_with_the_cause_chained():
    entry = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": -1}}
    with pytest.raises(PrecisionConfigError, match=r"trainer\.callbacks\[0\].*every_n_train_steps=-1") as caught:
        resolve_trainer_cfg({"precision": "32-true", "callbacks": [entry]})
    assert "every_n_train_steps" in str(caught.value.__cause__)


def test_a_trainer_flag_written_false_is_false_from_python():
    kwargs = resolve_trainer_cfg({"enable_checkpointing": "false", "enable_progress_bar": "no"})
    assert kwargs["enable_checkpointing"] is False and kwargs["enable_progress_bar"] is False


@pytest.mark.parametrize(("key", "value"), [("max_steps", "abc"), ("max_steps", 1.5), ("log_every_n_steps", "x")])
def test_a_trainer_value_of_the_wrong_type_is_refused_naming_it(key, value):
    with pytest.raises(PrecisionConfigError, match=rf"trainer\.{key}: {value!r}"):
        plan_trainer_cfg({key: value})


def test_peft_under_bf16_true_is_left_to_the_adapters_live_dtype_not_called_unsafe():
    # HalfPrecisionForAudio keeps the adapters fp32 (keep_trainable_fp32): the config alone cannot call them bf16.
    cfg = {"precision": "bf16-true", "lightning_precision": {"peft": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        kwargs = plan_trainer_cfg(cfg, optimizer={"_target_": "torch.optim.AdamW"})
    assert kwargs.storage_dtype == torch.bfloat16  # the frozen base, and what the model is loaded in
    assert kwargs.verdict.status is Status.NOT_JUDGED
    assert "fit starts" in kwargs.verdict.message


def test_peft_with_a_plugin_that_casts_the_adapters_is_still_unsafe():
    plugin = HalfPrecisionForAudio("bf16-true", peft=True, keep_trainable_fp32=False)
    kwargs = plan_trainer_cfg(
        {"plugins": [plugin], "lightning_precision": {"peft": True}}, optimizer={"_target_": "torch.optim.AdamW"}
    )
    assert kwargs.verdict.status is Status.UNSAFE


def test_preserve_keys_under_an_autocast_precision_is_said_to_have_no_effect(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        plan_trainer_cfg({"precision": "bf16-mixed", "lightning_precision": {"preserve_keys": ["mel"]}})
    assert "preserve_keys has no effect under precision='bf16-mixed'" in caplog.text
