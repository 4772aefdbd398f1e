"""What the command-line tests share: the shipped configs and running the command in-process."""

import json
from pathlib import Path

from lightning_precision import cli

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TRAP = CONFIG_DIR / "bf16-true-adamw.yaml"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def explain_json(capsys, path, *overrides):
    code, out, err = run(capsys, "explain", path, *overrides, "--json")
    return code, json.loads(out), err


def assert_one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-precision: error:"), err
    assert "Traceback" not in err
