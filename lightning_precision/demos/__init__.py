"""Demo tasks that ship with the package, as Lightning ships ``lightning.pytorch.demos``.

:mod:`~lightning_precision.demos.teacher_task` is the built-in task of ``lightning-precision compare``, the tests,
the docs and the benchmarks: a student MLP imitating a fixed random teacher, small enough for a CPU.
:mod:`~lightning_precision.demos.stdlib_text` is a byte-level language-modelling corpus made of the Python standard
library's own source files (real text, on every machine, no download), split by file into training and held-out.
"""

from lightning_precision.demos.stdlib_text import (
    STDLIB_FILES,
    VOCAB_SIZE,
    RandomWindows,
    StdlibCorpus,
    StdlibTextDataModule,
    corpus_hash,
    encode,
    heldout_windows,
    load_corpus,
    read_corpus,
    split_files,
    stdlib_dir,
)
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
    "STDLIB_FILES",
    "VOCAB_SIZE",
    "RandomWindows",
    "StdlibCorpus",
    "StdlibTextDataModule",
    "TaskDataModule",
    "TaskModule",
    "TensorDictDataset",
    "build_optimizer",
    "corpus_hash",
    "cosine_lr_lambda",
    "encode",
    "heldout_windows",
    "load_corpus",
    "make_dataloader",
    "make_teacher_data",
    "read_corpus",
    "resolve_target",
    "split_files",
    "stdlib_dir",
]
