"""``explain`` reads an untrusted config without running it: nothing the file names is called or built."""

import pytest

from tests.cli.helpers import TRAP, assert_one_line_error, explain_json, run

HELPER_CLASS = "tests.cli.untrusted_helpers.WritesOnInit"
SECTIONS = ["strategy", "plugins", "callbacks"]


def _config(tmp_path, section, entry):
    """A config whose trainer ``section`` holds ``entry`` (a flow mapping), for one entry or a list of one."""
    value = f"[{entry}]" if section in ("plugins", "callbacks") else entry
    path = tmp_path / "untrusted.yaml"
    optimizer = "optimizer:\n  _target_: torch.optim.AdamW\n"
    path.write_text(f"trainer:\n  precision: bf16-mixed\n  {section}: {value}\n{optimizer}")
    return path


@pytest.mark.parametrize("section", SECTIONS)
def test_class_path_to_os_system_is_refused_and_never_run(capsys, tmp_path, section):
    marker = tmp_path / "marker"
    path = _config(tmp_path, section, f'{{class_path: os.system, init_args: {{command: "touch {marker}"}}}}')
    code, _, err = run(capsys, "explain", path)
    assert not marker.exists()
    assert code == 2
    assert_one_line_error(err)


@pytest.mark.parametrize("section", SECTIONS)
def test_target_to_os_system_is_refused_and_never_run(capsys, tmp_path, section):
    marker = tmp_path / "marker"
    path = _config(tmp_path, section, f'{{_target_: os.system, command: "touch {marker}"}}')
    code, _, err = run(capsys, "explain", path)
    assert not marker.exists()
    assert code == 2
    assert_one_line_error(err)


@pytest.mark.parametrize("section", SECTIONS)
def test_refusal_names_the_key_path_the_value_and_a_class_expected(capsys, tmp_path, section):
    path = _config(tmp_path, section, "{class_path: os.system, init_args: {command: 'true'}}")
    _, _, err = run(capsys, "explain", path)
    where = "trainer.strategy" if section == "strategy" else f"trainer.{section}[0]"
    assert f"{where}.class_path" in err and "'os.system'" in err and "not a class" in err


@pytest.mark.parametrize("key", ["class_path", "_target_"])
@pytest.mark.parametrize("section", SECTIONS)
def test_a_class_that_writes_on_init_is_read_not_built(capsys, tmp_path, section, key):
    marker = tmp_path / "marker"
    args = f"init_args: {{path: '{marker}'}}" if key == "class_path" else f"path: '{marker}'"
    path = _config(tmp_path, section, f"{{{key}: {HELPER_CLASS}, {args}}}")
    code, data, _ = explain_json(capsys, path)
    assert not marker.exists()
    assert code == 0 and data["precision"] == "bf16-mixed"


def test_a_strategy_class_is_reported_by_its_name_without_being_built(capsys, tmp_path):
    marker = tmp_path / "marker"
    path = _config(tmp_path, "strategy", f"{{class_path: {HELPER_CLASS}, init_args: {{path: '{marker}'}}}}")
    _, data, _ = explain_json(capsys, path)
    assert data["strategy"] == "WritesOnInit"


@pytest.mark.parametrize(
    ("target", "kind"),
    [("os.system", "function"), ("builtins.print", "function"), ("torch.optim", "module")],
)
def test_optimizer_that_is_not_a_class_is_refused_naming_the_path(capsys, tmp_path, target, kind):
    path = tmp_path / "opt.yaml"
    path.write_text(f"trainer:\n  precision: bf16-true\noptimizer:\n  _target_: {target}\n  command: 'true'\n")
    code, _, err = run(capsys, "explain", path)
    assert code == 2
    assert_one_line_error(err)
    assert "optimizer._target_" in err and repr(target) in err and kind in err


def test_the_fsdp2_strategy_is_planned_from_its_class_without_being_built(capsys, tmp_path, monkeypatch):
    from lightning_precision.strategies import FSDP2Strategy

    def refuse(*args, **kwargs):
        raise AssertionError("explain built the strategy")

    monkeypatch.setattr(FSDP2Strategy, "__init__", refuse)
    path = _config(tmp_path, "strategy", "{class_path: lightning_precision.strategies.FSDP2Strategy, "
                                         "init_args: {storage_dtype: bf16}}")  # fmt: skip
    code, data, _ = explain_json(capsys, path)
    assert code == (1 if data["verdict"]["unsafe"] else 0)  # planned, not built: the verdict decides the exit
    assert data["strategy"] == "FSDP2Strategy" and data["storage_dtype"] == "bfloat16"


def test_a_plugins_explicit_policy_is_read_from_its_init_args(capsys, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "trainer:\n  plugins:\n    - class_path: lightning_precision.HalfPrecisionForAudio\n"
        "      init_args: {precision: bf16-true, on_unsafe: error}\noptimizer:\n  _target_: torch.optim.AdamW\n"
    )
    code, data, _ = explain_json(capsys, path)
    assert code == 1  # AdamW on bf16 storage, under the plugin's own on_unsafe=error
    assert data["verdict"]["on_unsafe"] == "error" and data["plugin"] == "HalfPrecisionForAudio"


def test_a_plugins_precision_is_read_from_its_class(capsys, tmp_path):
    path = tmp_path / "double.yaml"
    path.write_text("trainer:\n  plugins: [{class_path: lightning.pytorch.plugins.precision.DoublePrecision}]\n")
    code, data, _ = explain_json(capsys, path)
    assert code == 0 and data["precision"] == "64-true" and data["plugin"] == "DoublePrecision"


def test_an_argument_the_class_does_not_take_is_named(capsys, tmp_path):
    path = _config(tmp_path, "callbacks", "{class_path: lightning.pytorch.callbacks.LearningRateMonitor, "
                                          "init_args: {no_such_arg: 1}}")  # fmt: skip
    code, _, err = run(capsys, "explain", path)
    assert code == 2
    assert_one_line_error(err)
    assert "trainer.callbacks[0]" in err and "no_such_arg" in err


def test_the_shipped_trap_is_still_explained(capsys):
    code, data, _ = explain_json(capsys, TRAP)
    assert code == 1 and data["verdict"]["status"] == "unsafe"  # explained in full, and failed like a linter
