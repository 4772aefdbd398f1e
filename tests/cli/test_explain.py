"""lightning-precision explain: the contract it prints agrees with the pairing rule, for files and overrides."""

import pytest

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.cli.yaml_loading import load_config, section
from lightning_precision.dtypes import dtype_name
from lightning_precision.modes import get_mode
from lightning_precision.pairing import judge
from lightning_precision.storage import resolve_storage_dtype
from tests.cli.helpers import CONFIGS, TRAP, assert_one_line_error, explain_json, run


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_explain_prints_the_rules_dtypes(capsys, path):
    code, data, _ = explain_json(capsys, path)
    cfg = load_config(path)
    model, optimizer = section(cfg, "model"), section(cfg, "optimizer")
    mode = get_mode(section(cfg, "trainer")["precision"])
    storage = resolve_storage_dtype(model, optimizer, precision=mode)
    verdict = judge(storage, classify_optimizer(optimizer))
    assert code == (1 if verdict.is_unsafe else 0)  # like a linter: the trap fails even though it only warns
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
    assert code == 1  # on_unsafe=warn: the run would proceed, but a linter's verdict is still "unsafe"
    rows = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:12])
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


def test_explain_without_optimizer_section_is_not_judged(capsys, tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("trainer:\n  max_steps: 5\n")
    code, data, _ = explain_json(capsys, path)
    assert code == 0
    assert data["precision"] == "32-true (Lightning's default)"
    assert data["verdict"]["status"] == "not judged" and data["contract"]["optimizers"] == []


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
    assert code == (1 if storage == "bfloat16" else 0)  # bf16 storage with torch AdamW: unsafe, the linter fails
    assert data["reduce_dtype"] == reduce
    assert data["strategy"] == "FSDP2Strategy"
    assert data["storage_dtype"] == storage and data["compute_dtype"] == "bfloat16"
    assert data["verdict"]["status"] == ("unsafe" if storage == "bfloat16" else "safe")


@pytest.mark.parametrize(
    ("trainer", "micro_batches", "summed_in", "grads"),
    [
        ("  precision: bf16-true\n", 1, "bfloat16", 2),
        ("  precision: bf16-true\n  accumulate_grad_batches: 16\n", 16, "bfloat16", 2),
        (
            "  accumulate_grad_batches: 16\n  plugins:\n    - class_path: lightning_precision.HalfPrecisionForAudio\n"
            "      init_args: {precision: bf16-true, accumulate_grad_dtype: float32}\n",
            16,
            "float32",
            4,
        ),
        ("  precision: bf16-mixed\n  accumulate_grad_batches: 4\n", 4, "bfloat16", 2),  # auto: bf16 for Compensated
        ("  precision: bf16-mixed\n  accumulate_grad_batches: 4\nmodel:\n  torch_dtype: float32\n", 4, "float32", 4),
        (
            "  precision: bf16-mixed\n  accumulate_grad_batches: 8\n"
            "  strategy: {name: fsdp2, storage_dtype: bf16, accumulate_grad_dtype: float32}\n",
            8,
            "float32",
            4,
        ),
    ],
)
def test_explain_names_the_gradient_accumulation_dtype(capsys, tmp_path, trainer, micro_batches, summed_in, grads):
    path = tmp_path / "accumulate.yaml"
    path.write_text(f"trainer:\n{trainer}optimizer:\n  _target_: lightning_precision.optim.CompensatedAdamW\n")
    code, data, _ = explain_json(capsys, path)
    assert code == 0
    assert (data["accumulate_grad_batches"], data["grad_accumulation_dtype"]) == (micro_batches, summed_in)
    assert data["bytes_per_param"]["grads"] == grads


def test_explain_table_has_the_accumulation_row(capsys, tmp_path):
    path = tmp_path / "accumulate.yaml"
    path.write_text("trainer:\n  precision: bf16-true\n  accumulate_grad_batches: 16\n"
                    "optimizer:\n  _target_: lightning_precision.optim.CompensatedAdamW\n")  # fmt: skip
    code, out, _ = run(capsys, "explain", path)
    assert code == 0
    assert "gradient accumulation              16 micro-batches summed in bfloat16" in out


def test_explain_notes_a_known_fault_of_the_installed_lightning(monkeypatch, tmp_path, capsys):
    from packaging.version import Version

    from lightning_precision import upstream
    from lightning_precision.cli import main

    monkeypatch.setattr(upstream, "installed_version", lambda package: Version("2.6.1"))
    config = tmp_path / "fsdp.yaml"
    config.write_text("trainer:\n  strategy: fsdp\n  precision: bf16-mixed\n")
    main(["explain", str(config)])
    assert "lightning 2.6.1 is affected by a known fault" in capsys.readouterr().out
