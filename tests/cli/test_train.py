"""lightning-precision train: a real run of the built-in task, its CSV log, checkpoints and refusals."""

import csv
from pathlib import Path

import pytest

from tests.cli.helpers import CONFIG_DIR, TRAP, assert_one_line_error, run


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


@pytest.mark.parametrize(("global_zero", "printed"), [(True, True), (False, False)])
def test_train_prints_its_summary_on_global_rank_zero_only(capsys, tmp_path, task, monkeypatch, global_zero, printed):
    import lightning.pytorch as pl

    # Every rank of a multi-process run returns from fit; only rank zero may print the summary.
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: global_zero))
    code, out, _ = run(capsys, "train", TRAP, "trainer.max_steps=2", "--output-dir", tmp_path)
    assert code == 0
    assert ("Trained 2 steps" in out) is printed


def test_train_builds_the_optimizer_it_judged_from_a_nemo_model_section(tmp_path, task):
    import torch

    from lightning_precision.cli.train import fit_task

    cfg = {
        "name": "nemo-style",
        "trainer": {"precision": "bf16-mixed", "max_steps": 2, "enable_checkpointing": False},
        "model": {"torch_dtype": "auto", "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "sched": {}}},
        "data": {"num_samples": 256},
    }
    run_ = fit_task(cfg)
    [optimizer] = run_.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    assert run_.kwargs.optimizer_path == "model.optim"


@pytest.mark.parametrize("section", ["strategy", "plugins", "callbacks"])
def test_train_refuses_os_system_where_a_class_is_expected_and_never_runs_it(capsys, tmp_path, section):
    marker = tmp_path / "marker"
    entry = f'{{class_path: os.system, init_args: {{command: "touch {marker}"}}}}'
    path = tmp_path / "untrusted.yaml"
    path.write_text(f"trainer:\n  max_steps: 1\n  {section}: {f'[{entry}]' if section != 'strategy' else entry}\n")
    code, _, err = run(capsys, "train", path, "--output-dir", tmp_path / "runs")
    assert not marker.exists()
    assert code == 2
    assert_one_line_error(err)
    assert "'os.system'" in err and "not a class" in err


def test_train_refuses_print_as_a_hydra_callback(capsys, tmp_path):
    path = tmp_path / "print.yaml"
    path.write_text("trainer:\n  max_steps: 1\n  callbacks: [{_target_: builtins.print}]\n")
    code, _, err = run(capsys, "train", path, "--output-dir", tmp_path / "runs")
    assert code == 2
    assert_one_line_error(err)
    assert "trainer.callbacks[0]._target_" in err and "'builtins.print'" in err


def test_train_refuses_a_module_as_the_optimizer(capsys, tmp_path):
    path = tmp_path / "module.yaml"
    path.write_text("trainer:\n  max_steps: 1\noptimizer:\n  _target_: torch.optim\n")
    code, _, err = run(capsys, "train", path, "--output-dir", tmp_path / "runs")
    assert code == 2
    assert_one_line_error(err)
    assert "optimizer._target_" in err and "'torch.optim'" in err and "module" in err


def test_a_trainer_flag_written_as_the_string_false_turns_the_feature_off(tmp_path, task):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_precision.cli.train import fit_task

    trainer = {"max_steps": 1, "enable_checkpointing": "false", "default_root_dir": str(tmp_path)}
    run_ = fit_task({"trainer": trainer, "data": {"num_samples": 256}})
    assert not any(isinstance(cb, ModelCheckpoint) for cb in run_.trainer.callbacks)
