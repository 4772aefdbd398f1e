"""The lightning-precision command itself: bad input exits 2 with one line, ``python -m`` works."""

import subprocess
import sys

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
