"""lightning-precision explain on LitGPT's config layout (top-level precision, devices, optimizer; no trainer)."""

import textwrap

import pytest

from tests.cli.helpers import assert_one_line_error, explain_json, run

# The layout of LitGPT's config_hub/finetune/<model>/lora.yaml, trimmed.
LORA = """
checkpoint_dir: checkpoints/meta-llama/Llama-3.2-1B
out_dir: out/finetune/lora-llama-3.2-1B
precision: bf16-true
quantize:
devices: 1
num_nodes: 1
lora_r: 32
lora_alpha: 16
data:
  class_path: litgpt.data.Alpaca2k
  init_args:
    mask_prompt: false
train:
  global_batch_size: 8
  max_steps:
seed: 1337
optimizer:
  class_path: torch.optim.AdamW
  init_args:
    lr: 0.0002
    weight_decay: 0.0
    betas:
      - 0.9
      - 0.95
"""


def _write(tmp_path, text, name="lora.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _ours(tmp_path, precision, optimizer="torch.optim.AdamW"):
    text = f"trainer:\n  precision: {precision}\noptimizer:\n  _target_: {optimizer}\n  lr: 0.0002\n"
    return _write(tmp_path, text, "ours.yaml")


JUDGED = ("storage_dtype", "compute_dtype", "optimizer_state", "verdict")


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "32-true", "16-true"])
def test_litgpt_config_is_judged_exactly_as_ours(capsys, tmp_path, precision):
    code, data, _ = explain_json(capsys, _write(tmp_path, LORA), f"precision={precision}")
    ours_code, ours, _ = explain_json(capsys, _ours(tmp_path, precision))
    assert code == ours_code and {k: data[k] for k in JUDGED} == {k: ours[k] for k in JUDGED}
    assert data["precision"] == precision
    assert data["contract"]["optimizers"] == ours["contract"]["optimizers"]
    assert "read as a LitGPT config" in data["notes"][0]


def test_litgpt_bf16_true_lora_with_adamw_is_the_trap(capsys, tmp_path):
    code, data, _ = explain_json(capsys, _write(tmp_path, LORA))
    assert code == 1 and data["verdict"]["unsafe"] is True and data["storage_dtype"] == "bfloat16"
    assert data["plugin"] == "HalfPrecision" and data["strategy"] == "auto"  # what LitGPT's Fabric builds


def test_litgpt_optimizer_as_a_torch_name_and_litgpt_defaults(capsys, tmp_path):
    _, named, _ = explain_json(capsys, _write(tmp_path, LORA), "optimizer=SGD")
    _, ours, _ = explain_json(capsys, _ours(tmp_path, "bf16-true", "torch.optim.SGD"))
    assert named["verdict"] == ours["verdict"]
    text = "\n".join(line for line in LORA.splitlines() if not line.startswith(("precision", "optimizer", "  ")))
    code, data, _ = explain_json(capsys, _write(tmp_path, text))
    assert code == 0 and data["precision"] == "bf16-mixed" and data["plugin"] == "MixedPrecision"
    assert data["contract"]["optimizers"][0]["optimizer"] == "torch.optim.adamw.AdamW"
    assert any("LitGPT picks bf16-mixed" in n for n in data["notes"])
    assert any("LitGPT's default AdamW" in n for n in data["notes"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("quantize=bnb.nf4", "quantize='bnb.nf4'"),
        ("precision=bf16-flash", "precision='bf16-flash' is this library's"),
        ("precision=bf16-fast", "precision='bf16-fast' is not a precision"),
    ],
)
def test_litgpt_settings_that_cannot_be_judged_exit_2_naming_them(capsys, tmp_path, override, named):
    code, _, err = run(capsys, "explain", _write(tmp_path, LORA), override)
    assert code == 2
    assert_one_line_error(err)
    assert named in err


def test_a_config_without_trainer_nor_litgpt_keys_is_still_refused(capsys, tmp_path):
    code, _, err = run(capsys, "explain", _write(tmp_path, "model:\n  torch_dtype: auto\n"))
    assert code == 2 and "needs a 'trainer:' mapping" in err


def test_a_litgpt_config_is_refused_where_a_trainer_must_be_built(tmp_path):
    from lightning_precision.cli.yaml_loading import ConfigInputError, load_config, load_layout, require_trainer_section

    path = _write(tmp_path, LORA)
    with pytest.raises(ConfigInputError, match="LitGPT config has no 'trainer:' section.*Fabric plugin"):
        require_trainer_section(load_layout(load_config(path), source=str(path)), source=str(path))
    ours = _ours(tmp_path, "bf16-true")
    assert require_trainer_section(load_layout(load_config(ours), source="x"), source="x").kind == "run"


def test_train_on_a_litgpt_config_exits_2_pointing_to_the_fabric_recipe(capsys, tmp_path):
    code, _, err = run(capsys, "train", _write(tmp_path, LORA))
    assert code == 2
    assert_one_line_error(err)
    assert "LitGPT" in err and "Fabric" in err
