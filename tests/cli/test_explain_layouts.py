"""lightning-precision explain on NeMo, LightningCLI and Hydra configs, read as they are written."""

import sys
import textwrap

import pytest
import torch

from lightning_precision import PrecisionConfigError, resolve_trainer_cfg
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.pairing import judge
from tests.cli.helpers import TRAP, assert_one_line_error, explain_json, run

# A NeMo config as NeMo writes it: the exp_manager interpolation only resolves inside a Hydra app.
NEMO = """
name: QuartzNet15x5
trainer:
  devices: 1
  precision: bf16-true
  max_steps: 2
model:
  sample_rate: 16000
  optim:
    name: {name}
    lr: 1.0e-3
    betas: [0.9, 0.98]
    weight_decay: 1.0e-3
    sched:
      name: CosineAnnealing
      warmup_steps: 10
exp_manager:
  exp_dir: ${{hydra:runtime.output_dir}}
  name: ${{name}}
"""


def _write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_nemo_config_with_torch_adamw_is_unsafe_with_the_same_exit_codes_as_ours(capsys, tmp_path):
    path = _write(tmp_path, NEMO.format(name="adamw"))
    code, data, _ = explain_json(capsys, path)
    ours_code, ours, _ = explain_json(capsys, TRAP)
    assert (code, data["verdict"]["unsafe"]) == (ours_code, True) == (1, True)
    assert data["storage_dtype"] == "bfloat16"
    assert data["contract"]["optimizers"][0]["optimizer"] == ours["contract"]["optimizers"][0]["optimizer"]
    assert data["notes"] == [
        "ignored top-level section(s) exp_manager, name: not about precision",
        "model.optim (name: adamw) read as torch.optim.AdamW",
    ]
    code, out, err = run(capsys, "explain", path, "+trainer.lightning_precision.on_unsafe=error")
    assert code == 1 and "UNSAFE (on_unsafe=error)" in out
    assert_one_line_error(err)


def test_nemo_only_optimizer_is_classified_by_its_class_path(capsys, tmp_path):
    code, data, _ = explain_json(capsys, _write(tmp_path, NEMO.format(name="fused_adam")))
    assert code == (1 if data["verdict"]["unsafe"] else 0)
    assert data["contract"]["optimizers"][0]["optimizer"] == "apex.optimizers.FusedAdam"  # not installed here
    verdict = judge(torch.bfloat16, classify_optimizer("apex.optimizers.FusedAdam"))
    assert data["verdict"]["status"] == verdict.status.value != "safe"


def test_unknown_nemo_optimizer_name_exits_2_listing_the_known_names(capsys, tmp_path):
    code, _, err = run(capsys, "explain", _write(tmp_path, NEMO.format(name="adamq")))
    assert code == 2
    assert_one_line_error(err)
    assert "'adamq'" in err and "fused_adam" in err and "adamw" in err


def test_lightning_cli_config_with_the_optimizer_as_a_model_init_arg(capsys, tmp_path):
    path = _write(
        tmp_path,
        """
        seed_everything: 0
        trainer:
          precision: bf16-mixed
        model:
          class_path: my_project.AudioModule
          init_args:
            torch_dtype: bfloat16
            optimizer:
              class_path: torch.optim.AdamW
              init_args:
                lr: 1.0e-4
        """,
    )
    code, data, _ = explain_json(capsys, path)
    assert code == 1  # unsafe under on_unsafe=warn: explain fails like a linter
    assert data["storage_dtype"] == "bfloat16" and data["verdict"]["unsafe"] is True  # bf16 storage, torch AdamW
    assert data["contract"]["optimizers"][0]["optimizer"] == "torch.optim.adamw.AdamW"
    assert "optimizer read from model.init_args.optimizer" in data["notes"]


def test_composed_hydra_config_is_read_with_notes(capsys, tmp_path):
    path = _write(
        tmp_path,
        """
        defaults:
          - _self_
          - optimizer: adamw
        hydra:
          run:
            dir: outputs/${now:%Y-%m-%d}
        trainer:
          precision: bf16-mixed
        model:
          torch_dtype: auto
        optimizer:
          _target_: torch.optim.AdamW
          lr: 1.0e-4
        """,
    )
    code, data, _ = explain_json(capsys, path)
    assert code == 0 and data["verdict"]["status"] == "safe" and data["storage_dtype"] == "float32"
    assert data["notes"][0] == "ignored top-level section(s) hydra: not about precision"
    assert "Hydra 'defaults' list" in data["notes"][1] and "--cfg job" in data["notes"][1]


def test_raw_hydra_file_without_a_trainer_exits_2_saying_to_compose_it(capsys, tmp_path):
    path = _write(tmp_path, "defaults:\n  - trainer: default\n  - _self_\nmodel:\n  torch_dtype: auto\n")
    code, _, err = run(capsys, "explain", path)
    assert code == 2
    assert_one_line_error(err)
    assert "needs a 'trainer:' mapping" in err and "--cfg job" in err


@pytest.mark.parametrize(
    ("model", "paths"),
    [
        ("{optim: {name: sgd, lr: 0.1}}", "optimizer and model.optim"),
        ("{init_args: {optimizer: {class_path: torch.optim.SGD}}}", "optimizer and model.init_args.optimizer"),
    ],
)
def test_conflicting_optimizer_sections_exit_2_naming_both(capsys, tmp_path, model, paths):
    text = f"trainer:\n  precision: bf16-mixed\nmodel: {model}\noptimizer:\n  _target_: torch.optim.AdamW\n"
    code, _, err = run(capsys, "explain", _write(tmp_path, text))
    assert code == 2
    assert_one_line_error(err)
    assert f"{paths} both set the optimizer and disagree" in err


# NeMo's own placeholders in what the library does not read: a ??? NeMo's script fills in, a resolver only NeMo's
# app registers, and a scheduler that interpolates both.
NEMO_PLACEHOLDERS = """
trainer:
  devices: 1
  precision: bf16-true
model:
  train_ds:
    manifest_filepath: ???
  encoder:
    d_model: ${sum:1,2}
  optim:
    name: adamw
    lr: {lr}
    sched:
      name: NoamAnnealing
      d_model: ${model.encoder.d_model}
      max_steps: ???
"""


def test_nemo_placeholders_and_app_resolvers_outside_what_is_read_give_the_same_verdict(capsys, tmp_path):
    code, data, _ = explain_json(capsys, _write(tmp_path, NEMO_PLACEHOLDERS.replace("{lr}", "1.0e-3")))
    clean = "trainer:\n  precision: bf16-true\nmodel:\n  optim:\n    name: adamw\n    lr: 1.0e-3\n"
    clean_code, clean_data, _ = explain_json(capsys, _write(tmp_path, clean, "clean.yaml"))
    assert (code, data["verdict"]) == (clean_code, clean_data["verdict"]) and data["verdict"]["unsafe"] is True
    assert data["contract"] == clean_data["contract"]


@pytest.mark.parametrize(
    ("lr", "named"),
    [("???", "model.optim.lr is '???'"), ("${sum:1,2}", "model.optim.lr cannot be resolved (Unsupported")],
)
def test_a_placeholder_in_a_value_that_is_read_exits_2_naming_its_path(capsys, tmp_path, lr, named):
    code, _, err = run(capsys, "explain", _write(tmp_path, NEMO_PLACEHOLDERS.replace("{lr}", lr)))
    assert code == 2
    assert_one_line_error(err)
    assert named in err


def test_a_placeholder_precision_exits_2_naming_trainer_precision(capsys, tmp_path):
    text = NEMO_PLACEHOLDERS.replace("{lr}", "1.0e-3").replace("precision: bf16-true", "precision: ???")
    code, _, err = run(capsys, "explain", _write(tmp_path, text))
    assert code == 2 and "trainer.precision is '???'" in err
    path = _write(tmp_path, NEMO_PLACEHOLDERS.replace("{lr}", "1.0e-3"), "given.yaml")
    code, _, err = run(capsys, "explain", path, "trainer.precision=???")  # an override: not read as null
    assert code == 2 and "trainer.precision is '???'" in err


NEMO2_PLUGIN = {
    "target": "plugins:\n    _target_: nemo.lightning.MegatronMixedPrecision\n    precision: {p}\n    params_dtype: bf16",
    "list": "plugins:\n    - _target_: nemo.lightning.pytorch.plugins.MegatronMixedPrecision\n      precision: {p}",
    "class_path": "plugins:\n    - class_path: nemo.lightning.pytorch.plugins.mixed_precision.MegatronMixedPrecision\n"
    "      init_args:\n        precision: {p}",
}


@pytest.fixture
def without_nemo(monkeypatch):
    """NeMo absent, whether or not it is installed beside (``import nemo`` raises)."""
    from lightning_precision import config_frameworks

    monkeypatch.setitem(sys.modules, "nemo", None)
    monkeypatch.setattr(config_frameworks, "installed_version", lambda package: None)


@pytest.mark.usefixtures("without_nemo")
@pytest.mark.parametrize("form", sorted(NEMO2_PLUGIN))
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_nemo2_precision_plugin_is_read_without_nemo(capsys, tmp_path, form, precision):
    with pytest.raises(ImportError):
        import nemo  # noqa: F401 - the point: NeMo does not import here
    text = "trainer:\n  devices: 1\n  " + NEMO2_PLUGIN[form].format(p=precision) + "\n"
    code, data, _ = explain_json(capsys, _write(tmp_path, text))
    assert code == 0 and data["precision"] == precision and data["plugin"] == "MegatronMixedPrecision"
    assert data["compute_dtype"] == ("bfloat16" if precision == "bf16-mixed" else "float16")
    assert f"read without importing it: precision {precision} from its 'precision' field" in data["notes"][0]
    assert ("params_dtype" in " ".join(data["notes"])) is (form == "target")  # named as not judged


@pytest.mark.parametrize(("given", "read"), [("fp16", "16-mixed"), ("bf16", "bf16-mixed"), ("bf16-true", "32-true")])
def test_nemo2_precision_plugin_reads_precision_as_nemo_does(capsys, tmp_path, given, read):
    text = "trainer:\n  " + NEMO2_PLUGIN["list"].format(p=given) + "\n"
    code, data, _ = explain_json(capsys, _write(tmp_path, text))
    assert code == 0 and data["precision"] == read
    assert (f"'{given}': NeMo runs 32-true for anything but" in data["notes"][0]) is (read == "32-true")


@pytest.mark.usefixtures("without_nemo")
def test_resolve_trainer_cfg_cannot_build_nemo2_plugin_without_nemo_and_names_it():
    entry = {"_target_": "nemo.lightning.MegatronMixedPrecision", "precision": "bf16-mixed"}
    with pytest.raises(
        PrecisionConfigError,
        match=r"trainer\.plugins\[0\]: the precision plugin "
        r"nemo\.lightning\.MegatronMixedPrecision cannot be built: it does not import here.*Install NeMo 2",
    ):
        resolve_trainer_cfg({"plugins": entry})


def test_nemo2_plugin_missing_from_the_installed_nemo_is_not_called_a_missing_install(monkeypatch):
    # NeMo 3.0.0 installs, and its nemo.lightning no longer holds NeMo 2's MegatronMixedPrecision.
    from packaging.version import Version

    from lightning_precision import config_frameworks

    monkeypatch.setattr(config_frameworks, "installed_version", lambda package: Version("3.0.0"))
    entry = {"_target_": "nemo.lightning.MegatronMixedPrecision", "precision": "bf16-mixed"}
    with pytest.raises(PrecisionConfigError, match=r"nemo_toolkit 3\.0\.0 is installed and does not provide it") as err:
        resolve_trainer_cfg({"plugins": entry})
    assert "Install NeMo" not in str(err.value)
