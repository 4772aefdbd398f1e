"""A checkpoint file under its real name is always complete.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` writes through an fsspec transaction whose
temporary file lies in the system temp directory; when that is another file system than the checkpoints (a tmpfs
``/tmp``, a container's overlay), the commit is a copy, and a process killed during it leaves a truncated file under
the real name (``last.ckpt`` included: ``ckpt_path="last"`` then fails to load). :class:`AtomicCheckpointIO` writes
next to the target instead and renames on the same file system.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_precision._logging import info_rank_zero
from lightning_precision.strategies.checkpoint_staging import fsync_directory

PARTIAL_SUFFIX = ".partial"
# ".<target name>.<8 hex>.partial": what save_checkpoint writes before the rename; Lightning never reads it.
_PARTIAL_NAME = re.compile(rf"^\..+\.[0-9a-f]{{8}}{re.escape(PARTIAL_SUFFIX)}$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save each checkpoint to a hidden file next to its target, fsync it, then ``os.replace`` it onto the target.

    A process killed at any moment leaves the target either as it was or complete: never truncated. Partial files left
    by a killed run (``.<name>.<hex>.partial``) are removed, with one log line, the first time this plugin saves into
    their directory (one run writes to a checkpoint directory at a time, as ``ModelCheckpoint`` assumes). Remote
    paths (``s3://`` and other non-local fsspec file systems) are saved by Lightning's own code: an object store
    publishes an object whole. Loading and removing are Lightning's.

    Example::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The state to save (anything ``torch.save`` accepts).
            path: The target file.
            storage_options: Not supported (as for Lightning's ``TorchCheckpointIO``).

        Raises:
            TypeError: If ``storage_options`` is given, or ``path`` is not a string or path.
            ValueError: If ``path`` is empty.
            IsADirectoryError: If ``path`` is an existing directory.
            NotADirectoryError: If a parent of ``path`` is a file.
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options={storage_options!r}): storage_options "
                "are not supported; give a CheckpointIO plugin of your own that uses them."
            )
        target = _local_target(path)
        if target is None:
            super().save_checkpoint(checkpoint, path)
            return
        directory = target.parent
        _make_directory(directory, target)
        if directory not in self._cleaned:
            self._cleaned.add(directory)
            remove_partial_files(directory)
        partial = directory / f".{target.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            # os.open applies the umask, as a plain open() would for the target itself.
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_directory(directory)

    @override
    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load the checkpoint at ``path`` with Lightning's own loader, after checking the path.

        Args:
            path: The checkpoint file.
            *args: Passed on to Lightning's ``TorchCheckpointIO.load_checkpoint`` (``map_location``, and
                ``weights_only`` where the installed Lightning takes it).
            **kwargs: As ``args``.

        Raises:
            TypeError: If ``path`` is not a string or path.
            ValueError: If ``path`` is empty.
            IsADirectoryError: If ``path`` is a directory.
        """
        _local_target(path)
        return super().load_checkpoint(path, *args, **kwargs)


def remove_partial_files(directory: Path) -> list[Path]:
    """Remove what killed :class:`AtomicCheckpointIO` saves left in ``directory``; one log line if anything was there.

    Returns:
        The removed files.
    """
    removed = [p for p in sorted(directory.iterdir()) if _PARTIAL_NAME.match(p.name) and p.is_file()]
    for partial in removed:
        partial.unlink(missing_ok=True)
    if removed:
        names = ", ".join(p.name for p in removed)
        info_rank_zero(
            f"AtomicCheckpointIO: removed {len(removed)} partial checkpoint file(s) left by an interrupted save in "
            f"{directory}: {names} (the checkpoints under their real names are complete)."
        )
    return removed


def _local_target(path: Any) -> Path | None:
    """``path`` as a local path; ``None`` for a remote fsspec URL."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"AtomicCheckpointIO: the checkpoint path must be a str or os.PathLike, got {path!r}.")
    if str(path).strip() == "":
        raise ValueError(f"AtomicCheckpointIO: the checkpoint path is empty ({path!r}); give a file path.")
    fs = get_filesystem(path)
    if "file" not in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)):
        return None
    target = Path(fs._strip_protocol(str(path)))
    if target.is_dir():
        raise IsADirectoryError(
            f"AtomicCheckpointIO: the checkpoint path {str(path)!r} is a directory; give a file path."
        )
    return target


def _make_directory(directory: Path, target: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise NotADirectoryError(
            f"AtomicCheckpointIO: cannot save {str(target)!r}: a parent of it is a file, not a directory ({error})."
        ) from error
