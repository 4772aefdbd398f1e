"""Atomic checkpoint staging: a checkpoint is written under a hidden staging path and moved onto its real path only
once complete, so the real path is always either the previous complete checkpoint or the new complete one.

Lightning writes a sharded checkpoint straight into its path. When that directory already holds a checkpoint
(``last.ckpt`` with ``save_last=True`` is rewritten in place), a rank that dies mid-save leaves the previous
``.metadata`` and ``meta.pt`` next to a mix of new and old shard files: a directory that loads without error but holds
parameters from two different steps. Here a save goes through hidden names that neither Lightning's
``ckpt_path="last"`` nor ``ModelCheckpoint`` take for a checkpoint:

* ``.<name>.incomplete``: being written, or (after an exchange) the old checkpoint about to be removed. Never promoted.
* ``.<name>.complete``: every rank has written it; only the fallback below creates it. Always the newest checkpoint.
* ``.<name>.replaced``: the previous checkpoint, set aside by the fallback below.

On Linux the complete staging directory and the real path are swapped with one ``renameat2(RENAME_EXCHANGE)``: there
is no moment without a complete checkpoint under the real name. Where the file system refuses it (NFS, FUSE, other
systems), the old checkpoint is set aside first (two renames); :func:`recover_staged` (run at strategy setup) then
finishes a save that was killed between them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lightning_precision._logging import info_rank_zero, warn_once

INCOMPLETE, COMPLETE, REPLACED = "incomplete", "complete", "replaced"
_STAGED_NAME = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{INCOMPLETE}|{COMPLETE}|{REPLACED})$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The file system or kernel cannot exchange: fall back to two renames.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def staged_path(path: Path, kind: str = INCOMPLETE) -> Path:
    """The hidden name ``.<name>.<kind>`` next to ``path`` (``kind``: incomplete, complete or replaced)."""
    return path.with_name(f".{path.name}.{kind}")


def save_staged(path: Path, write: Callable[[Path], None], strategy: Any) -> None:
    """Write a checkpoint for ``path`` with ``write(staging)`` on every rank, then move it onto ``path``.

    Args:
        path: The checkpoint path (the same on every rank).
        write: Writes the checkpoint (every rank its part) to the path it is given.
        strategy: Provides ``is_global_zero`` and ``barrier()``; rank zero alone touches the file system paths.
    """
    staging = staged_path(path)
    if strategy.is_global_zero:
        remove_path(staging)  # left over from an interrupted save
        remove_path(staged_path(path, COMPLETE))  # older than what is about to be written
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


def remove_staged(path: Path) -> None:
    """Remove the checkpoint at ``path``, if any, through its hidden ``.<name>.incomplete`` name (never promoted, and
    removed by the next save or setup): a deletion killed midway leaves nothing partial under the real name."""
    if not exists(path):
        return
    staging = staged_path(path)
    remove_path(staging)
    path.rename(staging)
    fsync_directory(path.parent)
    remove_path(staging)


def exists(path: Path) -> bool:
    """Whether anything (a dangling link included) is at ``path``."""
    return path.exists() or path.is_symlink()


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap what ``first`` and ``second`` name in one atomic step; ``False`` if this system cannot (nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(code)}", str(first), None, str(second))


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    except OSError:
        return None


def replace_path(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` onto ``path`` (a file or a directory, replacing either).

    Atomic where the system can exchange two paths or both are files; otherwise the old checkpoint is set aside
    first, and a save killed in between is finished by :func:`recover_staged`.
    """
    if not exists(path):
        staging.rename(path)
    elif staging.is_file() and path.is_file() and not path.is_symlink():
        os.replace(staging, path)
    elif exchange_paths(staging, path):
        remove_path(staging)  # now the previous checkpoint, under a name that is never promoted
    else:
        complete = staged_path(path, COMPLETE)
        staging.rename(complete)  # marks it complete: recovery promotes it
        _promote_complete(complete, path)
    fsync_directory(path.parent)


def _promote_complete(complete: Path, path: Path) -> None:
    """Move ``.<name>.complete`` onto ``path`` by renames that :func:`recover_staged` can resume after a kill."""
    replaced = staged_path(path, REPLACED)
    if exists(path):
        remove_path(replaced)
        path.rename(replaced)
    complete.rename(path)
    remove_path(replaced)


def recover_staged(directories: Iterable[Path]) -> list[str]:
    """Finish or clean up saves that were killed, in each of ``directories``; returns what was done, one entry each.

    A complete staged checkpoint (``.<name>.complete``) is moved onto its real name, the previous one
    (``.<name>.replaced``) restored only where nothing newer exists, and partial writes (``.<name>.incomplete``)
    are removed.
    """
    done: list[str] = []
    for directory in dict.fromkeys(Path(d) for d in directories):
        if not directory.is_dir():
            continue
        staged = [(entry, _STAGED_NAME.match(entry.name)) for entry in sorted(directory.iterdir())]
        for entry, match in staged:
            if match is None or not exists(entry):
                continue
            path = directory / match["name"]
            kind = match["kind"]
            if kind == COMPLETE:
                _promote_complete(entry, path)
                done.append(f"promoted the complete {entry.name} to {path}")
            elif kind == REPLACED and not exists(path) and not exists(staged_path(path, COMPLETE)):
                entry.rename(path)
                done.append(f"restored {entry.name} to {path}")
            else:
                remove_path(entry)
                why = "left by an interrupted save" if kind == INCOMPLETE else "superseded"
                done.append(f"removed {entry.name} ({why})")
        fsync_directory(directory)
    return done


def recover_trainer_checkpoints(trainer: Any, strategy: Any) -> list[str]:
    """Run :func:`recover_staged` on rank zero over the directories of the trainer's checkpoint callbacks, say what
    was done in one log line, and make every rank wait for it.

    ``ckpt_path="last"`` is chosen before a strategy is set up; only a save killed between the two renames of the
    fallback (a file system without an atomic exchange) can need a promotion here, and then a warning says that this
    fit did not resume from the promoted checkpoint.
    """
    done: list[str] = []
    if strategy.is_global_zero:
        directories = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        done = recover_staged(directories)
        if done:
            name = type(strategy).__name__
            info_rank_zero(f"{name}: interrupted checkpoint saves found at start: {'; '.join(done)}.")
        if any(line.startswith(("promoted", "restored")) for line in done):
            warn_once(
                f"checkpoint-promoted:{done}",
                f"{type(strategy).__name__}: a checkpoint whose save was interrupted was completed at start, after "
                "this fit chose its ckpt_path; start again with ckpt_path='last' to resume from it.",
            )
    strategy.barrier()
    return done
