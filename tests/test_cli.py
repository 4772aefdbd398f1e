"""The lightning-precision command: explain (against the pairing rule), exit codes, train and compare end to end."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_precision import cli
from lightning_precision.dtypes import dtype_name
from lightning_precision.modes import get_mode
from lightning_precision.pairing import classify_optimizer, judge, resolve_storage_dtype
from lightning_precision.runconfig import load_config, section

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_explain_prints_the_rules_dtypes(capsys, path):
    code, data, _ = explain_json(capsys, path)
    cfg = load_config(path)
    model, optimizer = section(cfg, "model"), section(cfg, "optimizer")
    mode = get_mode(section(cfg, "trainer")["precision"])
    storage = resolve_storage_dtype(model, optimizer, precision=mode)
    verdict = judge(storage, classify_optimizer(optimizer))
    assert code == 0  # every shipped config is safe, or (the trap) only warns
    assert data["storage_dtype"] == dtype_name(storage)
    assert data["compute_dtype"] == dtype_name(mode.compute_dtype)
    assert data["precision"] == mode.name
    assert data["verdict"]["status"] == verdict.status.value
    assert data["contract"]["optimizers"][0]["optimizer"] == classify_optimizer(optimizer).name
    assert data["reduce_dtype"] == "-"
    memory = data["bytes_per_param"]
    assert memory["params"] == memory["grads"] == storage.itemsize
    assert memory["total"] == pytest.approx(memory["params"] + memory["grads"] + memory["optimizer_state"])


def test_explain_table_shows_the_trap_and_both_fixes(capsys):
    code, out, _ = run(capsys, "explain", TRAP)
    assert code == 0
    rows = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:11])
    assert rows["parameter storage"].strip() == "bfloat16"
    assert rows["optimizer state"].strip() == "exp_avg bfloat16, exp_avg_sq bfloat16 (predicted)"
    assert rows["verdict"].strip() == "UNSAFE (on_unsafe=warn)"
    assert "(1) keep fp32 storage" in out and "(2) keep bfloat16 storage" in out


def test_explain_json_of_unsafe_config_carries_the_fixes(capsys):
    _, data, _ = explain_json(capsys, TRAP)
    assert data["verdict"]["unsafe"] is True and len(data["verdict"]["fixes"]) == 2


def test_unsafe_under_error_exits_1_after_printing_the_table(capsys):
    code, out, err = run(capsys, "explain", TRAP, "trainer.lightning_precision.on_unsafe=error")
    assert code == 1
    assert "UNSAFE (on_unsafe=error)" in out
    assert_one_line_error(err)
    assert "torch.optim.adamw.AdamW" in err and "on_unsafe='error'" in err


def test_override_makes_the_trap_safe(capsys):
    code, data, _ = explain_json(capsys, TRAP, "trainer.precision=bf16-mixed")
    assert code == 0 and data["verdict"]["status"] == "safe" and data["storage_dtype"] == "float32"


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


def test_explain_without_optimizer_section_is_not_judged(capsys, tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("trainer:\n  max_steps: 5\n")
    code, data, _ = explain_json(capsys, path)
    assert code == 0
    assert data["precision"] == "32-true (Lightning's default)"
    assert data["verdict"]["status"] == "not judged" and data["contract"]["optimizers"] == []


def test_added_key_with_plus_is_accepted(capsys):
    code, _, _ = run(capsys, "explain", TRAP, "+trainer.log_every_n_steps=1")
    assert code == 0


@pytest.mark.parametrize(
    ("strategy", "reduce", "storage"),
    [
        ("fsdp2", "float32", "float32"),  # NeMo AutoModel's default policy: reduce in fp32
        ("{name: fsdp2}", "float32", "float32"),
        ("{name: fsdp2, mp_policy: {param_dtype: bf16}}", "float32", "float32"),
        ("{name: fsdp2, mp_policy: {param_dtype: bf16, reduce_dtype: bf16}}", "bfloat16", "float32"),
        ("{name: fsdp2, storage_dtype: bf16}", "float32", "bfloat16"),  # the strategy's own choice is judged
        (
            "{_target_: lightning_precision.strategies.FSDP2Strategy, mp_policy: {reduce_dtype: fp32}}",
            "float32",
            "float32",
        ),
    ],
)
def test_fsdp2_dtypes_are_the_strategys_own_decision(capsys, tmp_path, strategy, reduce, storage):
    path = tmp_path / "fsdp2.yaml"
    path.write_text(
        f"trainer:\n  precision: bf16-mixed\n  strategy: {strategy}\n"
        "optimizer:\n  _target_: torch.optim.AdamW\nmodel:\n  torch_dtype: auto\n"
    )
    code, data, _ = explain_json(capsys, path)
    assert code == 0
    assert data["reduce_dtype"] == reduce
    assert data["strategy"] == "FSDP2Strategy"
    assert data["storage_dtype"] == storage and data["compute_dtype"] == "bfloat16"
    assert data["verdict"]["status"] == ("unsafe" if storage == "bfloat16" else "safe")


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


# --- training (needs the built-in task) --------------------------------------------------------------------------


@pytest.fixture
def task():
    return pytest.importorskip("lightning_precision.demos")


def _metrics(output_dir, name):
    [path] = Path(output_dir, name).glob("version_*/metrics.csv")
    with path.open() as f:
        return [row for row in csv.DictReader(f) if row.get("train_loss")]


def test_train_writes_a_csv_log_with_loss_rows(capsys, tmp_path, task):
    code, out, _ = run(
        capsys,
        "train",
        CONFIG_DIR / "bf16-mixed.yaml",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "--output-dir",
        tmp_path,
    )
    assert code == 0
    rows = _metrics(tmp_path, "bf16-mixed")
    assert len(rows) == 6 and all(float(r["train_loss"]) > 0 for r in rows)
    assert "Trained 6 steps" in out
    assert not list(tmp_path.rglob("*.ckpt"))  # not asked for checkpoints


def test_train_checkpoints_when_asked(capsys, tmp_path, task):
    code, _, _ = run(
        capsys,
        "train",
        CONFIG_DIR / "bf16-true-compensated.yaml",
        "trainer.max_steps=4",
        "--ckpt-every",
        "2",
        "--output-dir",
        tmp_path,
    )
    assert code == 0
    assert len([p for p in tmp_path.rglob("*.ckpt") if p.name != "last.ckpt"]) == 2


def test_train_refuses_unsafe_under_error(capsys, tmp_path, task):
    code, _, err = run(capsys, "train", TRAP, "trainer.lightning_precision.on_unsafe=error", "--output-dir", tmp_path)
    assert code == 1
    assert_one_line_error(err)


def test_train_flash_config_without_cuda_exits_2(capsys, tmp_path, task):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the flash config would train")
    code, _, err = run(capsys, "train", CONFIG_DIR / "bf16-flash.yaml", "--output-dir", tmp_path)
    assert code == 2
    assert_one_line_error(err)
    assert "needs a CUDA device" in err


def test_compare_prints_the_table_and_writes_the_plot(capsys, tmp_path, task):
    code, out, _ = run(
        capsys,
        "compare",
        "--steps",
        "6",
        "--recipes",
        "32-true",
        "bf16-true+adamw",
        "bf16-flash",
        "--output-dir",
        tmp_path,
    )
    assert code == 0
    lines = out.splitlines()
    header = lines[1].split()
    assert header == [
        "recipe",
        "storage",
        "optimizer",
        "optimizer",
        "state",
        "final",
        "loss",
        "vs",
        "fp32",
        "bytes/param",
        "s/step",
    ]
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert rows["32-true"][1:4] == ["float32", "torch.AdamW", "float32"]
    assert rows["32-true"][5] == "1.000x" and rows["32-true"][6] == "16.0"
    assert rows["bf16-true+adamw"][1] == "bfloat16" and rows["bf16-true+adamw"][3] == "bfloat16"
    import torch

    if not torch.cuda.is_available():  # never faked on CPU: listed as skipped, with the reason below the table
        assert rows["bf16-flash"][4] == "skipped" and "bf16-flash: skipped: needs CUDA" in out
    assert (tmp_path / "compare_loss.png").stat().st_size > 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [len(r["losses"]) for r in data["results"][:2]] == [6, 6]


def test_compare_exits_1_when_a_recipe_crashes(capsys, tmp_path, task, monkeypatch):
    from lightning_precision import compare

    broken = compare.Recipe("broken", "32-true", {"_target_": "no_such_module.AdamW"})
    monkeypatch.setitem(compare.RECIPES, "broken", broken)
    code, out, _ = run(capsys, "compare", "--steps", "2", "--recipes", "broken", "--output-dir", tmp_path)
    assert code == 1
    assert "broken: crashed:" in out
