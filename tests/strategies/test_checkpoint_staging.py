"""Atomic checkpoint staging: the real path is always a complete checkpoint."""

from __future__ import annotations

import pytest

from lightning_precision.strategies.checkpoint_staging import replace_path


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
