"""Demo tasks that ship with the package, as Lightning ships ``lightning.pytorch.demos``.

:mod:`~lightning_precision.demos.teacher_task` is the built-in task of ``lightning-precision compare``, the tests,
the docs and the benchmarks: a student MLP imitating a fixed random teacher, small enough for a CPU.
"""

from lightning_precision.demos.teacher_task import (
    AUDIO_KEY,
    DEFAULT_LAST_K,
    DEFAULT_MAX_STEPS,
    TaskDataModule,
    TaskModule,
    TensorDictDataset,
    build_optimizer,
    cosine_lr_lambda,
    make_dataloader,
    make_teacher_data,
    resolve_target,
)

__all__ = [
    "AUDIO_KEY",
    "DEFAULT_LAST_K",
    "DEFAULT_MAX_STEPS",
    "TaskDataModule",
    "TaskModule",
    "TensorDictDataset",
    "build_optimizer",
    "cosine_lr_lambda",
    "make_dataloader",
    "make_teacher_data",
    "resolve_target",
]
