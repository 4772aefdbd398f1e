"""``lightning-precision export``: exit codes, the table, and one-line errors for bad input."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lightning_precision.export_record import PARAM_NAMES_KEY
from tests.cli.helpers import assert_one_line_error, run


def save_checkpoint(path, p=None, c=None):
    p = torch.ones(4, dtype=torch.bfloat16) if p is None else p
    c = torch.full((4,), 2.0**-8, dtype=torch.bfloat16) if c is None else c
    checkpoint = {
        "state_dict": {"model.w": p, "model.steps": torch.tensor(7)},
        "optimizer_states": [{"state": {0: {"compensation": c}}, "param_groups": [{"params": [0]}]}],
        PARAM_NAMES_KEY: [["model.w"]],
    }
    torch.save(checkpoint, path)
    return path


def test_export_writes_safetensors_and_prints_the_table(capsys, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run.ckpt")
    code, out, err = run(capsys, "export", ckpt, tmp_path / "out", "--dtype", "fp32", "--strip-prefix", "model.")
    assert code == 0, err
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(weights["w"], torch.full((4,), 1 + 2.0**-8))
    assert "float32" in out and "int64" in out and "bytes written" in out


def test_max_shard_size_option_shards_the_output(capsys, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run.ckpt")
    code, _, err = run(capsys, "export", ckpt, tmp_path / "out", "--max-shard-size", "10")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_dtype_exits_2_naming_value_and_choices(capsys, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run.ckpt")
    code, _, err = run(capsys, "export", ckpt, tmp_path / "out", "--dtype", "int8")
    assert code == 2
    assert_one_line_error(err)
    assert "'int8'" in err and "bf16, fp16, fp32" in err
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_exits_2(capsys, tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "export", tmp_path / "x.ckpt", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err)
    assert "x.ckpt" in err and not (tmp_path / "out").exists()


def test_missing_checkpoint_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "export", tmp_path / "absent.ckpt", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err)
    assert "absent.ckpt" in err


def test_distributed_checkpoint_with_missing_shard_exits_2(capsys, tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for shard in (tmp_path / "dcp").glob("*.distcp"):
        shard.unlink()
    code, _, err = run(capsys, "export", tmp_path / "dcp", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err)
    assert "missing" in err and not (tmp_path / "out").exists()


def test_unwritable_output_exits_2(capsys, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run.ckpt")
    (tmp_path / "blocker").write_text("")
    code, _, err = run(capsys, "export", ckpt, tmp_path / "blocker" / "out")
    assert code == 2
    assert_one_line_error(err)
    assert "not writable" in err
