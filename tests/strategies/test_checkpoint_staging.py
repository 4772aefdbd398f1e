"""Atomic checkpoint staging: the real path is always a complete checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_precision.strategies import checkpoint_staging
from lightning_precision.errors import PrecisionWarning
from lightning_precision.strategies.checkpoint_staging import (
    exchange_paths,
    recover_staged,
    recover_trainer_checkpoints,
    remove_staged,
    replace_path,
    staged_path,
)
from tests._checkpoint_kill import other_file_system, run_kills


@pytest.fixture(params=["exchange", "two renames"])
def rename_mode(request, monkeypatch):
    """Run a test with the atomic exchange and with the fallback for file systems that cannot exchange."""
    if request.param == "two renames":
        monkeypatch.setattr(checkpoint_staging, "exchange_paths", lambda first, second: False)
    return request.param


@pytest.mark.usefixtures("rename_mode")
@pytest.mark.parametrize("new_is_dir", [False, True], ids=["new file", "new dir"])
@pytest.mark.parametrize("old", ["absent", "file", "dir", "symlink"])
def test_staged_checkpoint_replaces_whatever_was_at_the_path(tmp_path, new_is_dir, old):
    def make(path, is_dir, text):
        if is_dir:
            path.mkdir()
            (path / "meta.pt").write_text(text)
        else:
            path.write_text(text)

    path, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.incomplete"
    if old == "symlink":  # ModelCheckpoint(save_last="link") leaves last.ckpt as a link to a top-k checkpoint
        make(tmp_path / "epoch=0-step=2.ckpt", True, "old")
        path.symlink_to(tmp_path / "epoch=0-step=2.ckpt")
    elif old != "absent":
        make(path, old == "dir", "old")
    make(staging, new_is_dir, "new")
    replace_path(staging, path)
    assert not path.is_symlink() and path.is_dir() is new_is_dir
    assert (path / "meta.pt" if new_is_dir else path).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt"] + (["epoch=0-step=2.ckpt"] if old == "symlink" else [])
    )
    if old == "symlink":
        assert (tmp_path / "epoch=0-step=2.ckpt" / "meta.pt").read_text() == "old"  # the link target is untouched


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for path in (first, second):
        path.mkdir()
        (path / "name").write_text(path.name)
    if not exchange_paths(first, second):
        pytest.skip(f"this file system cannot exchange paths atomically ({tmp_path})")
    assert (first / "name").read_text() == "b" and (second / "name").read_text() == "a"


def _checkpoint(path: Path, step: int) -> Path:
    path.mkdir()
    (path / ".metadata").write_text("dcp")
    (path / "meta.pt").write_text(str(step))
    return path


def _steps(directory: Path) -> dict[str, str]:
    return {p.name: (p / "meta.pt").read_text() for p in sorted(directory.iterdir())}


def test_recovery_removes_a_partial_save_and_keeps_the_real_checkpoint(tmp_path):
    _checkpoint(tmp_path / "last.ckpt", 4)
    (tmp_path / ".last.ckpt.incomplete").mkdir()
    done = recover_staged([tmp_path])
    assert _steps(tmp_path) == {"last.ckpt": "4"} and done == [
        "removed .last.ckpt.incomplete (left by an interrupted save)"
    ]


def test_a_removal_killed_midway_leaves_no_partial_checkpoint_under_its_real_name(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "epoch=0.ckpt", 1)
    _checkpoint(tmp_path / "epoch=1.ckpt", 2)
    real_remove = checkpoint_staging.remove_path

    def killed_midway(path):  # deletes the metadata, then the process dies (as a SIGKILL during rmtree would)
        if path.exists():
            (path / "meta.pt").unlink()
            raise KeyboardInterrupt
        real_remove(path)

    monkeypatch.setattr(checkpoint_staging, "remove_path", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        remove_staged(tmp_path / "epoch=0.ckpt")
    monkeypatch.setattr(checkpoint_staging, "remove_path", real_remove)
    assert not (tmp_path / "epoch=0.ckpt").exists()  # every checkpoint under a real name is whole
    assert recover_staged([tmp_path]) == ["removed .epoch=0.ckpt.incomplete (left by an interrupted save)"]
    assert _steps(tmp_path) == {"epoch=1.ckpt": "2"}


def test_recovery_promotes_a_complete_save_over_the_older_checkpoint(tmp_path):
    _checkpoint(tmp_path / "last.ckpt", 4)  # killed after marking step 5 complete, before setting step 4 aside
    _checkpoint(tmp_path / ".last.ckpt.complete", 5)
    done = recover_staged([tmp_path])
    assert _steps(tmp_path) == {"last.ckpt": "5"} and done[0].startswith("promoted the complete .last.ckpt.complete")


def test_recovery_promotes_a_complete_save_killed_between_the_two_renames(tmp_path):
    _checkpoint(tmp_path / ".last.ckpt.replaced", 4)
    _checkpoint(tmp_path / ".last.ckpt.complete", 5)
    recover_staged([tmp_path])
    assert _steps(tmp_path) == {"last.ckpt": "5"}


def test_recovery_restores_a_set_aside_checkpoint_when_nothing_newer_exists(tmp_path):
    _checkpoint(tmp_path / ".epoch=0-step=4.ckpt.replaced", 4)
    done = recover_staged([tmp_path])
    assert done == [f"restored .epoch=0-step=4.ckpt.replaced to {tmp_path / 'epoch=0-step=4.ckpt'}"]
    assert _steps(tmp_path) == {"epoch=0-step=4.ckpt": "4"}


def test_recovery_leaves_a_clean_directory_and_a_missing_one_alone(tmp_path):
    _checkpoint(tmp_path / "last.ckpt", 4)
    (tmp_path / ".hidden").write_text("not ours")
    assert recover_staged([tmp_path, tmp_path / "absent"]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.ckpt"]


def test_a_save_killed_at_every_step_of_the_fallback_recovers_to_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Simulate a kill after each rename of the two-rename fallback: recovery always ends with step 5 as last.ckpt."""
    monkeypatch.setattr(checkpoint_staging, "exchange_paths", lambda first, second: False)
    renames = 0
    real_rename = Path.rename

    def rename_then_die_at(limit):
        def rename(self, target):
            nonlocal renames
            if renames == limit:
                raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
            renames += 1
            return real_rename(self, target)

        return rename

    for limit in range(3):
        directory = tmp_path / str(limit)
        directory.mkdir()
        _checkpoint(directory / "last.ckpt", 4)
        _checkpoint(staged_path(directory / "last.ckpt"), 5)
        renames = 0
        monkeypatch.setattr(Path, "rename", rename_then_die_at(limit))
        with pytest.raises(KeyboardInterrupt):
            replace_path(staged_path(directory / "last.ckpt"), directory / "last.ckpt")
        monkeypatch.setattr(Path, "rename", real_rename)
        recover_staged([directory])
        expected = "4" if limit == 0 else "5"  # before the first rename, step 5 is not yet known complete
        assert _steps(directory) == {"last.ckpt": expected}, limit



class _RankZero:
    """What recover_trainer_checkpoints asks of a strategy (a one-process stand-in, not FSDP2 or gloo)."""

    is_global_zero = True

    def barrier(self) -> None:
        pass


def test_recovery_at_setup_logs_one_line_and_warns_that_this_fit_did_not_resume_from_the_promoted(tmp_path, caplog):
    _checkpoint(tmp_path / ".last.ckpt.complete", 5)
    (tmp_path / ".epoch=0-step=5.ckpt.incomplete").mkdir()
    trainer = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(dirpath=str(tmp_path))])
    with caplog.at_level(logging.INFO, logger="lightning_precision"), pytest.warns(PrecisionWarning, match="start again"):
        done = recover_trainer_checkpoints(trainer, _RankZero())
    assert len(done) == 2 and _steps(tmp_path) == {"last.ckpt": "5"}
    assert caplog.text.count("interrupted checkpoint saves found at start") == 1


@pytest.mark.distributed
def test_sigkills_during_fsdp2_saves_resume_from_the_last_complete_checkpoint(tmp_path):
    """2 ranks on gloo, each save a DCP directory; 8 SIGKILLs at seeded random moments around the saves."""
    run = run_kills(2, kills=8, seed=23, workdir=tmp_path, tmpdir=other_file_system(tmp_path), max_delay_s=0.15)
    assert run.kills == 8 and run.resumed == sorted(run.resumed) and run.resumed[-1] > 0
    assert run.mid_save >= 1, f"no kill landed inside a save ({run}): the run did not test what it claims"

