"""AtomicCheckpointIO: a checkpoint file under its real name is complete; the config uses it unless the user set one."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy

from lightning_precision import AtomicCheckpointIO, resolve_trainer_cfg
from lightning_precision.checkpoint_io import remove_partial_files
from tests._checkpoint_kill import other_file_system, run_kills


def test_save_then_load_gives_the_checkpoint_and_leaves_only_the_target(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"step": 3, "w": torch.arange(4.0)}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_saved_file_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o640


def test_save_replaces_an_existing_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_remove_checkpoint_removes_the_file(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "epoch=0-step=1.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.remove_checkpoint(path)
    assert not path.exists()


def test_first_save_into_a_directory_removes_partial_files_of_a_killed_run_and_says_so(tmp_path, caplog):
    leftover = tmp_path / ".epoch=0-step=4.ckpt.0a1b2c3d.partial"
    leftover.write_bytes(b"trunc")
    unrelated = tmp_path / "notes.partial"
    unrelated.write_text("kept")
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        AtomicCheckpointIO().save_checkpoint({"step": 5}, tmp_path / "last.ckpt")
    assert not leftover.exists() and unrelated.exists()
    assert "removed 1 partial checkpoint file" in caplog.text and leftover.name in caplog.text


def test_remove_partial_files_is_silent_when_nothing_is_left(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        assert remove_partial_files(tmp_path) == []
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("path", "error", "words"),
    [
        (None, TypeError, "got None"),
        (3, TypeError, "got 3"),
        ("", ValueError, "is empty"),
        ("  ", ValueError, "is empty"),
    ],
)
def test_a_bad_path_is_refused_with_its_value(path, error, words):
    with pytest.raises(error, match=words):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, path)


def test_a_directory_as_path_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path)


def test_a_file_as_parent_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a parent of it is a file"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "file" / "last.ckpt")


def test_storage_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "a.ckpt", storage_options={"x": 1})


def test_resolved_config_saves_atomically_by_default():
    kwargs = resolve_trainer_cfg({"accelerator": "cpu", "logger": False})
    assert [type(p) for p in kwargs["plugins"]] == [AtomicCheckpointIO]


def test_the_atomic_saver_is_appended_to_the_users_plugins():
    env = LightningEnvironment()
    kwargs = resolve_trainer_cfg({"plugins": [env]})
    assert kwargs["plugins"][0] is env and [type(p) for p in kwargs["plugins"][1:]] == [AtomicCheckpointIO]


def test_a_users_checkpoint_io_plugin_is_kept():
    mine = TorchCheckpointIO()
    kwargs = resolve_trainer_cfg({"plugins": [mine]})
    assert kwargs["plugins"] == [mine]


def test_a_users_checkpoint_io_plugin_from_yaml_is_kept():
    kwargs = resolve_trainer_cfg({"plugins": [{"class_path": "lightning.pytorch.plugins.io.TorchCheckpointIO"}]})
    assert [type(p) for p in kwargs["plugins"]] == [TorchCheckpointIO]


def test_a_strategys_own_checkpoint_io_is_kept():
    mine = TorchCheckpointIO()
    kwargs = resolve_trainer_cfg({"strategy": DDPStrategy(checkpoint_io=mine)})
    assert "plugins" not in kwargs and kwargs["strategy"].checkpoint_io is mine


def test_sigkills_during_single_process_saves_resume_from_the_last_complete_checkpoint(tmp_path):
    """14 SIGKILLs at seeded random moments around the saves of a Trainer built by resolve_trainer_cfg, TMPDIR on a
    tmpfs and checkpoints on disk (Lightning's own saver then leaves truncated files under real names)."""
    run = run_kills(1, kills=14, seed=23, workdir=tmp_path, tmpdir=other_file_system(tmp_path), max_delay_s=0.1)
    assert run.kills == 14 and run.resumed == sorted(run.resumed) and run.resumed[-1] > 0
    assert run.mid_save >= 1, f"no kill landed inside a save ({run}): the run did not test what it claims"
