"""lightning-precision explain: will it fit (GiB per device, FSDP2 sharding, one peak definition), its exit code."""

import pytest
import torch

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.cli.compare import RECIPES, CompareReport
from lightning_precision.cli.explain_memory import parse_params
from lightning_precision.memory import PEAK_DEFINITION
from lightning_precision.modes import get_mode
from lightning_precision.pairing import judge
from tests.cli.helpers import TRAP, assert_one_line_error, explain_json, run

GIB = 2**30
SEVEN_B = 7 * 10**9
FP32_ADAMW = 4 + 4 + 4 + 4  # fp32 weights + fp32 grads + fp32 exp_avg + fp32 exp_avg_sq


def _config(tmp_path, precision="bf16-mixed", strategy=None, accelerator="auto", optimizer="torch.optim.AdamW",
            on_unsafe="warn"):  # fmt: skip
    path = tmp_path / "run.yaml"
    strategy_line = f"  strategy: {strategy}\n" if strategy else ""
    path.write_text(
        f"trainer:\n  precision: {precision}\n  accelerator: {accelerator}\n{strategy_line}"
        f"  lightning_precision: {{on_unsafe: {on_unsafe}}}\n"
        f"model:\n  torch_dtype: auto\noptimizer:\n  _target_: {optimizer}\n"
    )
    return path


def _own(data):
    (row,) = [r for r in data["memory"]["rows"] if r["own"]]
    return row


@pytest.mark.parametrize(
    ("text", "count"),
    [("7B", SEVEN_B), ("1.5B", 1_500_000_000), ("125M", 125_000_000), ("125000000", 125_000_000), ("350k", 350_000)],
)
def test_params_accepts_integers_and_k_m_b_t_suffixes(text, count):
    assert parse_params(text) == count


@pytest.mark.parametrize("bad", ["7Q", "seven", "0", "-3", "0.5", "1.5"])
def test_bad_params_exit_2_naming_the_value_and_the_forms(capsys, bad):
    code, _, err = run(capsys, "explain", TRAP, f"--params={bad}")
    assert code == 2
    assert_one_line_error(err)
    assert repr(bad) in err and "125M, 1.5B, 7B" in err


def test_devices_below_one_exit_2(capsys):
    code, _, err = run(capsys, "explain", TRAP, "--params", "7B", "--devices", "0")
    assert code == 2
    assert_one_line_error(err)
    assert "--devices 0" in err and ">= 1" in err


def test_fsdp2_shards_weights_grads_and_state_over_the_devices(capsys, tmp_path):
    code, data, _ = explain_json(capsys, _config(tmp_path, strategy="fsdp2"), "--params", "7B", "--devices", "8")
    gib = _own(data)["gib_per_device"]
    assert code == 0 and data["memory"]["sharded"] is True
    assert gib["steady"] == pytest.approx(SEVEN_B * FP32_ADAMW / 8 / GIB)
    assert (gib["weights"], gib["grads"], gib["optimizer_state"]) == pytest.approx(
        (SEVEN_B * 4 / 8 / GIB, SEVEN_B * 4 / 8 / GIB, SEVEN_B * 8 / 8 / GIB)
    )


def test_without_fsdp2_every_device_holds_a_replica(capsys, tmp_path):
    _, data, _ = explain_json(capsys, _config(tmp_path), "--params", "7B", "--devices", "8")
    assert data["memory"]["sharded"] is False
    assert _own(data)["gib_per_device"]["steady"] == pytest.approx(SEVEN_B * FP32_ADAMW / GIB)


def test_peak_on_an_accelerator_adds_torchs_foreach_copy_of_the_parameters(capsys, tmp_path):
    _, data, _ = explain_json(capsys, _config(tmp_path), "--params", "7B")
    gib = _own(data)["gib_per_device"]
    assert data["memory"]["device"] == "accelerator"
    assert gib["peak"] == pytest.approx(SEVEN_B * (FP32_ADAMW + 4) / GIB)  # one fp32 copy: 4 B/param


def test_peak_on_the_cpu_is_the_steady_state_for_torchs_per_tensor_step(capsys, tmp_path):
    _, data, _ = explain_json(capsys, _config(tmp_path, accelerator="cpu"), "--params", "7B")
    gib = _own(data)["gib_per_device"]
    assert data["memory"]["device"] == "cpu"
    assert gib["peak"] == pytest.approx(gib["steady"])


def test_without_params_the_table_is_per_parameter_and_says_how_to_get_gib(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", _config(tmp_path))
    _, data, _ = explain_json(capsys, _config(tmp_path))
    assert code == 0 and data["memory"]["params"] is None
    assert all(row["gib_per_device"] is None for row in data["memory"]["rows"])
    assert "--params" in out and "never builds the model" in out


def test_alternatives_are_compares_recipes_that_the_rule_judges_safe(capsys):
    _, data, _ = explain_json(capsys, TRAP, "--params", "1.5B")
    alternatives = [row for row in data["memory"]["rows"] if not row["own"]]
    expected = set()
    for recipe in RECIPES.values():
        mode = get_mode(recipe.precision)
        info = classify_optimizer(recipe.optimizer)
        storage = mode.storage_dtype or torch.float32  # a mixed precision's recipe: fp32 storage
        if not judge(storage, info, precision=mode).is_unsafe:
            expected.add(recipe.precision)
    assert {row["precision"] for row in alternatives} == expected
    assert all(row["status"] != "unsafe" for row in alternatives)


def test_the_configs_own_recipe_is_marked_once_and_first(capsys):
    _, data, _ = explain_json(capsys, TRAP, "--params", "7B")
    rows = data["memory"]["rows"]
    assert [row["own"] for row in rows].count(True) == 1 and rows[0]["own"]
    assert (rows[0]["precision"], rows[0]["status"]) == ("bf16-true", "unsafe")


def test_full_precision_alternatives_keep_the_configs_optimizer(capsys, tmp_path):
    path = _config(tmp_path, precision="bf16-true", optimizer="torch.optim.SGD")
    _, data, _ = explain_json(capsys, path, "--params", "7B")
    fp32_rows = [row for row in data["memory"]["rows"] if row["storage_dtype"] == "float32"]
    assert fp32_rows and all(row["optimizer"] == "SGD" for row in fp32_rows)


def test_the_text_table_names_the_config_and_states_the_peak_definition(capsys):
    _, out, _ = run(capsys, "explain", TRAP, "--params", "7B", "--devices", "2")
    assert "(this config)" in out and "GiB" in out
    assert PEAK_DEFINITION in " ".join(out.split())


def test_explain_and_compare_state_the_same_peak_definition(capsys):
    _, data, _ = explain_json(capsys, TRAP)
    report = CompareReport(results=[], steps=1, seed=0, threads=1, seconds=0.0)
    assert data["memory"]["definition"] == data["peak_definition"] == PEAK_DEFINITION
    assert PEAK_DEFINITION in report.format_text()


def test_json_keeps_the_existing_fields_and_adds_the_memory_table(capsys):
    _, data, _ = explain_json(capsys, TRAP, "--params", "7B")
    existing = {"source", "precision", "plugin", "strategy", "storage_dtype", "compute_dtype", "reduce_dtype",
                "accumulate_grad_batches", "grad_accumulation_dtype", "optimizer_state", "bytes_per_param", "verdict",
                "contract", "error", "notes"}  # fmt: skip
    assert existing | {"memory", "peak_definition"} <= set(data)
    assert data["bytes_per_param"] == _own(data)["bytes_per_param"]


@pytest.mark.parametrize(("on_unsafe", "code"), [("warn", 1), ("error", 1), ("ignore", 0)])
def test_an_unsafe_verdict_exits_1_unless_on_unsafe_ignore_accepts_the_risk(capsys, tmp_path, on_unsafe, code):
    path = _config(tmp_path, precision="bf16-true", on_unsafe=on_unsafe)
    assert run(capsys, "explain", path)[0] == code


def test_a_safe_config_exits_0(capsys, tmp_path):
    assert run(capsys, "explain", _config(tmp_path))[0] == 0


def test_an_unsafe_verdict_fails_with_one_line_saying_how_to_pass(capsys, tmp_path):
    _, _, err = run(capsys, "explain", _config(tmp_path, precision="bf16-true"))
    assert_one_line_error(err)
    assert "on_unsafe: ignore" in err and "--exit-zero" in err


@pytest.mark.parametrize("on_unsafe", ["warn", "error"])
def test_exit_zero_only_reports(capsys, tmp_path, on_unsafe):
    path = _config(tmp_path, precision="bf16-true", on_unsafe=on_unsafe)
    code, out, _ = run(capsys, "explain", path, "--exit-zero")
    assert code == 0 and "UNSAFE" in out


def test_exit_zero_still_exits_2_on_bad_input(capsys):
    assert run(capsys, "explain", TRAP, "--exit-zero", "--params", "lots")[0] == 2
