"""The lightning-precision command itself: bad input exits 2 with one line, ``python -m`` works."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import TRAP, assert_one_line_error, run


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["explain", "no/such/config.yaml"], "not found"),
        (["explain", TRAP, "trainer.max_stepz=3"], "unknown key 'trainer.max_stepz'"),
        (["explain", TRAP, "trainer.max_steps"], "not key=value"),
        (["explain", TRAP, "trainer.precision=bf17-true"], "bf17-true"),
        (["explain", TRAP, "model.torch_dtype=int8"], "model.torch_dtype"),
        (["train", TRAP, "trainer.nope=1"], "unknown key"),
    ],
    ids=["missing-file", "unknown-key", "no-equals", "unknown-precision", "bad-dtype", "train-unknown-key"],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err)
    assert needle in err


def test_unparsable_yaml_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  precision: [bf16-true\n")
    code, _, err = run(capsys, "explain", bad)
    assert code == 2
    assert_one_line_error(err)
    assert "not valid YAML" in err


def test_added_key_with_plus_is_accepted(capsys):
    code, _, _ = run(capsys, "explain", TRAP, "+trainer.log_every_n_steps=1", "--exit-zero")
    assert code == 0


def test_python_dash_m_help_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_precision", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("explain", "train", "compare"))


_BASE = "trainer:\n  max_steps: 1\n  enable_progress_bar: false\n"
_ADAMW = "optimizer:\n  _target_: torch.optim.AdamW\n"
_CALLBACK = "  callbacks: [{_target_: lightning.pytorch.callbacks.%s}]\n"


def _config(tmp_path, text: str | bytes):
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except PermissionError:
        return locked / "runs"
    (locked / "probe").unlink()  # root writes anyway: a directory of /proc cannot be created, even by root
    return Path("/proc/lightning-precision-test/runs") if Path("/proc/self").is_dir() else pytest.skip("no /proc")


# (id, argv after the subcommand given a path to the written config, config text, the bad value the error names)
_BAD_INPUTS = [
    ("binary-file", ["explain", "{cfg}"], bytes(range(256)), "config.yaml"),
    ("utf16-file", ["explain", "{cfg}"], _BASE.encode("utf-16"), "UTF-8"),
    ("recursive-alias", ["explain", "{cfg}"], _BASE + "x: &loop [*loop]\n", "alias"),
    ("top-level-false", ["explain", "{cfg}"], "false\n", "top level must be a mapping"),
    ("top-level-quoted-number", ["explain", "{cfg}"], "'0'\n", "top level must be a mapping"),
    ("betas-abc", ["train", "{cfg}"], _BASE + _ADAMW + "  betas: [0.9, abc]\n", "'abc'"),
    ("threads-negative", ["compare", "--threads", "-1", "--steps", "1"], None, "threads: -1"),
    ("output-dir-is-a-file", ["train", "{cfg}", "--output-dir", "{file}"], _BASE, "a-file"),
    ("compare-output-dir-is-a-file", ["compare", "--steps", "1", "--output-dir", "{file}"], None, "a-file"),
    ("unwritable-output-dir", ["train", "{cfg}", "--output-dir", "{locked}"], _BASE, "runs"),
    ("seed-abc", ["train", "{cfg}"], _BASE + "seed: abc\n", "seed: 'abc'"),
    ("depth-0", ["train", "{cfg}"], _BASE + "model:\n  depth: 0\n", "depth=...): 0"),
    ("batch-size-0", ["train", "{cfg}"], _BASE + "data:\n  batch_size: 0\n", "batch_size=...): 0"),
    ("misspelt-optimizer-keyword", ["train", "{cfg}"], _BASE + _ADAMW + "  weight_decy: 0.1\n", "weight_decy"),
    ("explain-misspelt-optimizer-keyword", ["explain", "{cfg}"], _BASE + _ADAMW + "  weight_decy: 0.1\n", "weight_decy"),
    ("explain-max-steps-abc", ["explain", "{cfg}", "trainer.max_steps=abc"], _BASE, "trainer.max_steps: 'abc'"),
    ("lr-negative", ["train", "{cfg}"], _BASE + _ADAMW + "  lr: -1\n", "optimizer.lr: -1"),
    (
        "optimizer-is-a-function",
        ["train", "{cfg}"],
        _BASE + "optimizer:\n  _target_: torch.optim.adamw.adamw\n",
        "adamw",
    ),
    (
        "callback-constructor-fails",
        ["train", "{cfg}"],
        _BASE + _CALLBACK % "ModelCheckpoint, every_n_train_steps: -1",
        "every_n_train_steps=-1",
    ),
    ("callback-unknown-keyword", ["train", "{cfg}"], _BASE + _CALLBACK % "LearningRateMonitor, nope: 1", "nope"),
    (
        "callback-required-argument-missing",
        ["train", "{cfg}"],
        _BASE + _CALLBACK % "EarlyStopping",
        "EarlyStopping",
    ),
    ("callback-is-a-string", ["train", "{cfg}"], _BASE + "  callbacks: [abc]\n", "trainer.callbacks[0] is 'abc'"),
    ("callbacks-is-a-number", ["train", "{cfg}"], _BASE + "  callbacks: 7\n", "trainer.callbacks is 7"),
    ("max-steps-abc", ["train", "{cfg}", "trainer.max_steps=abc"], _BASE, "trainer.max_steps: 'abc'"),
    ("trainer-flag-not-a-bool", ["train", "{cfg}", "trainer.enable_progress_bar=maybe"], _BASE, "'maybe'"),
]


@pytest.mark.parametrize(("argv", "text", "needle"), [c[1:] for c in _BAD_INPUTS], ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_exits_2_naming_the_value_without_a_traceback(capsys, tmp_path, argv, text, needle):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    paths = {"cfg": _config(tmp_path, text) if text is not None else None, "file": a_file}
    if "{locked}" in argv:
        paths["locked"] = _unwritable_directory(tmp_path)
    argv = [a.format(**paths) for a in argv]
    if argv[0] == "train" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "runs")]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    assert needle in err


@pytest.mark.parametrize("before", [True, False], ids=["before-subcommand", "after-subcommand"])
def test_debug_shows_the_traceback_of_a_bad_input(capsys, tmp_path, before):
    path = _config(tmp_path, _BASE + "seed: abc\n")
    argv = ["train", path, "--output-dir", tmp_path / "runs"]
    code, _, err = run(capsys, *(["--debug", *argv] if before else [*argv, "--debug"]))
    assert code == 2
    assert "Traceback" in err and "Invalid seed: 'abc'" in err


def test_debug_shows_the_constructor_error_a_config_error_wraps(capsys, tmp_path):
    path = _config(tmp_path, _BASE + _CALLBACK % "ModelCheckpoint, every_n_train_steps: -1")
    code, _, err = run(capsys, "train", path, "--output-dir", tmp_path / "runs", "--debug")
    assert code == 2
    assert "MisconfigurationException" in err and "direct cause" in err
