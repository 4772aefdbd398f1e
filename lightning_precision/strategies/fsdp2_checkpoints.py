"""The checkpoint hooks of :class:`~lightning_precision.strategies.FSDP2Strategy`: saves and removals that a kill
never leaves half done under a real name, and a resume that converts, checks and reports what it loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lightning_precision.export_record import record_for_export
from lightning_precision.strategies.checkpoint_staging import remove_staged, save_staged
from lightning_precision.strategies.fsdp2_resume import load_resume_checkpoint

CHECKPOINT_KEY = "lightning_precision_fsdp2"  # the resolved precision plan, in every checkpoint it saves


class FSDP2Checkpoints:
    """Mixed into ``FSDP2Strategy`` before ``ModelParallelStrategy``, whose checkpoint methods these wrap."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Save as ``ModelParallelStrategy`` does, into a hidden staging path that is renamed onto ``filepath`` only
        once every rank has written (see :mod:`~lightning_precision.strategies.checkpoint_staging` for why)."""
        if self.resolved is not None:
            checkpoint[CHECKPOINT_KEY] = self.resolved.to_dict()
        # Parameter names and the precision contract, for `lightning-precision export` (see export_record).
        record_for_export(checkpoint, getattr(self.lightning_module, "_trainer", None))
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # raises TypeError
        path = Path(self.broadcast(filepath))
        if path.is_dir() and not self._save_distributed_checkpoint and not _is_sharded_checkpoint(path):
            raise IsADirectoryError(f"The checkpoint path exists and is a directory: {path}")
        save_staged(path, lambda staging: super(FSDP2Checkpoints, self).save_checkpoint(checkpoint, staging), self)
        return None

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Remove an old checkpoint (``ModelCheckpoint``'s ``save_top_k``) by renaming it to a hidden staging name
        first: a kill during the deletion of a sharded directory leaves no partial checkpoint under its real name."""
        if self.is_global_zero:
            remove_staged(Path(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load every tensor in its saved dtype, convert it for this run, check it, report the storage change (see
        :mod:`~lightning_precision.strategies.fsdp2_resume`, which raises ``OptimizerStateError`` naming the fault)."""
        return load_resume_checkpoint(self, checkpoint_path, CHECKPOINT_KEY, weights_only)
