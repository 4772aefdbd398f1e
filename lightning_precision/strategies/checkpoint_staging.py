"""Atomic checkpoint staging: a checkpoint is written under a hidden staging path and renamed onto its real path only
once complete, so the real path is always either the previous complete checkpoint or the new complete one.

Lightning writes a sharded checkpoint straight into its path. When that directory already holds a checkpoint
(``last.ckpt`` with ``save_last=True`` is rewritten in place), a rank that dies mid-save leaves the previous
``.metadata`` and ``meta.pt`` next to a mix of new and old shard files: a directory that loads without error but holds
parameters from two different steps. An interrupted staged save leaves only ``.<name>.incomplete``, which neither
Lightning's ``ckpt_path="last"`` nor ``ModelCheckpoint`` take for a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def staging_path(path: Path) -> Path:
    """Where a checkpoint for ``path`` is written before it is complete."""
    return path.with_name(f".{path.name}.incomplete")


def save_staged(path: Path, write: Callable[[Path], None], strategy: Any) -> None:
    """Write a checkpoint for ``path`` with ``write(staging)`` on every rank, then move it onto ``path``.

    Args:
        path: The checkpoint path (the same on every rank).
        write: Writes the checkpoint (every rank its part) to the path it is given.
        strategy: Provides ``is_global_zero`` and ``barrier()``; rank zero alone touches the file system paths.
    """
    staging = staging_path(path)
    if strategy.is_global_zero:
        remove_path(staging)  # left over from an interrupted save
        path.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    write(staging)
    strategy.barrier()  # every rank has written its part (DCP writes .metadata last, after gathering all ranks)
    if strategy.is_global_zero:
        replace_path(staging, path)
    strategy.barrier()


def remove_path(path: Path) -> None:
    """Remove a file, a link or a directory tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def replace_path(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` onto ``path`` (a file or a directory, replacing either) by renames."""
    if not (path.exists() or path.is_symlink()):
        staging.rename(path)
        return
    if staging.is_file() and path.is_file() and not path.is_symlink():
        os.replace(staging, path)  # atomic
        return
    # A directory cannot atomically replace a non-empty one: set the old one aside first. A crash between the two
    # renames leaves the old checkpoint complete under .<name>.replaced and the new one under .<name>.incomplete.
    replaced = path.with_name(f".{path.name}.replaced")
    remove_path(replaced)
    path.rename(replaced)
    staging.rename(path)
    remove_path(replaced)
