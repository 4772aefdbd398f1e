"""A real-text language-modelling task that needs no download: the Python standard library's own source files.

Every CPython install ships the ``.py`` sources of its standard library under ``sysconfig.get_paths()["stdlib"]``.
:data:`STDLIB_FILES` is a fixed, sorted list of modules present in every CPython 3.11 and later (modules removed
by PEP 594 in 3.13, and modules that became packages or thin shims after 3.11, such as ``zipfile``, ``pathlib``,
``datetime`` and ``decimal``, are left out). Their *contents* differ between Python versions, so
:func:`corpus_hash` fingerprints the exact bytes read: results from two machines are comparable only when it matches.

Tokens are bytes (vocabulary 256, no tokenizer to ship). The split is by file, so no held-out byte is ever part of a
training window: the held-out files are a seeded choice of :data:`STDLIB_FILES`, the rest are concatenated into one
training stream. Training windows start at seeded random offsets of that stream; held-out windows are fixed,
non-overlapping chunks of the held-out files.

Samples are ``(input_ids, labels)`` pairs of ``int64`` tensors of shape ``(seq_len,)``, ``labels`` being
``input_ids`` shifted one byte ahead (the next-byte targets).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256
"""Byte-level tokens: one token per byte value."""

STDLIB_FILES: tuple[str, ...] = tuple(
    sorted(
        [
            "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py", "base64.py", "bisect.py",
            "calendar.py", "codecs.py", "collections/__init__.py", "concurrent/futures/_base.py", "configparser.py",
            "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "email/message.py", "enum.py",
            "fnmatch.py", "fractions.py", "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
            "gzip.py", "heapq.py", "hmac.py", "html/parser.py", "http/client.py", "http/server.py", "imaplib.py",
            "importlib/_bootstrap.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
            "locale.py", "logging/__init__.py", "mimetypes.py", "numbers.py", "operator.py", "optparse.py",
            "pickle.py", "platform.py", "plistlib.py", "poplib.py", "pprint.py", "queue.py", "quopri.py",
            "random.py", "re/_compiler.py", "re/_parser.py", "sched.py", "selectors.py", "shlex.py", "shutil.py",
            "smtplib.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
            "threading.py", "timeit.py", "tokenize.py", "trace.py", "traceback.py", "typing.py", "unittest/case.py",
            "urllib/parse.py", "urllib/request.py", "uuid.py", "wave.py", "weakref.py", "webbrowser.py",
            "xml/dom/minidom.py",
        ]
    )
)  # fmt: skip
"""Paths relative to the stdlib directory, sorted; the corpus is read in this order."""

DEFAULT_HELDOUT_FILES = 8
"""Files held out for evaluation by default (about a tenth of :data:`STDLIB_FILES`)."""


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard-library sources (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_corpus(files: tuple[str, ...] | list[str] = STDLIB_FILES, root: Path | str | None = None) -> dict[str, bytes]:
    """Read the listed files as bytes.

    Args:
        files: Paths relative to ``root``.
        root: Directory the paths are relative to (default: :func:`stdlib_dir`).

    Returns:
        ``{path: content}`` in the order of ``files``.

    Raises:
        FileNotFoundError: If any listed file is missing; the message names every missing file and ``root``
            (an install without ``.py`` sources, or a Python version that dropped a module).
    """
    base = Path(root) if root is not None else stdlib_dir()
    missing = [name for name in files if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"stdlib_text: {len(missing)} of {len(files)} listed file(s) not found under {base}: {missing}. The "
            "corpus needs CPython 3.11+ with its standard-library .py sources installed (some distributions ship "
            "only .pyc files; install the python3 source/dev package, or pass root= to a directory that has them)."
        )
    return {name: (base / name).read_bytes() for name in files}


def corpus_hash(corpus: dict[str, bytes]) -> str:
    """SHA-256 over every file's name and bytes, in the given order (the first 16 hex digits).

    Two runs trained on the same text exactly when their hashes match; a different Python version usually changes it.
    """
    digest = hashlib.sha256()
    for name, content in corpus.items():
        digest.update(name.encode() + b"\0" + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest()[:16]


def encode(text: bytes) -> Tensor:
    """Byte-level tokens of ``text``: an ``int64`` tensor with values in ``[0, 256)``."""
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def split_files(
    files: tuple[str, ...] | list[str] = STDLIB_FILES, heldout: int = DEFAULT_HELDOUT_FILES, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split a file list into training and held-out files, deterministically from ``seed``.

    Args:
        files: The file list (its order does not matter: it is sorted first).
        heldout: How many files to hold out.
        seed: Seed of the choice.

    Returns:
        ``(train, heldout)``, each sorted; disjoint, and together ``files``.

    Raises:
        ValueError: If ``heldout`` is not between 1 and ``len(files) - 1``.
    """
    ordered = sorted(files)
    if not 1 <= heldout < len(ordered):
        raise ValueError(
            f"stdlib_text: heldout must be in [1, {len(ordered) - 1}] for {len(ordered)} files, got {heldout}"
        )
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {ordered[i] for i in perm[:heldout]}
    return [f for f in ordered if f not in held], [f for f in ordered if f in held]


class RandomWindows(Dataset):
    """``num_windows`` windows of a token stream at seeded random offsets; item ``i`` is always the same window.

    Args:
        tokens: 1-D token stream.
        seq_len: Tokens per window.
        num_windows: Length of the data set.
        seed: Seed of the offsets.

    Raises:
        ValueError: If the stream is not longer than ``seq_len`` or ``num_windows`` is not positive.
    """

    def __init__(self, tokens: Tensor, seq_len: int, num_windows: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"RandomWindows: a stream of {len(tokens)} tokens is too short for seq_len={seq_len}")
        if num_windows <= 0:
            raise ValueError(f"RandomWindows: num_windows must be positive, got {num_windows}")
        self.tokens, self.seq_len = tokens, seq_len
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(tokens) - seq_len, (num_windows,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[index])
        chunk = self.tokens[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def heldout_windows(streams: list[Tensor], seq_len: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of each held-out file (no window crosses a file boundary).

    Args:
        streams: One token stream per held-out file.
        seq_len: Tokens per window.
        max_windows: Keep this many, evenly spaced over all windows (``None``: all).

    Returns:
        ``(input_ids, labels)``, each ``(windows, seq_len)`` ``int64``.
    """
    inputs, labels = [], []
    for stream in streams:
        count = (len(stream) - 1) // seq_len
        for w in range(count):
            chunk = stream[w * seq_len : (w + 1) * seq_len + 1]
            inputs.append(chunk[:-1])
            labels.append(chunk[1:])
    if not inputs:
        raise ValueError(f"heldout_windows: the held-out files are too short for seq_len={seq_len}")
    if max_windows is not None and max_windows < len(inputs):
        keep = torch.linspace(0, len(inputs) - 1, max_windows).round().long().tolist()
        inputs, labels = [inputs[i] for i in keep], [labels[i] for i in keep]
    return torch.stack(inputs), torch.stack(labels)


@dataclass(frozen=True)
class StdlibCorpus:
    """The corpus split by file.

    Attributes:
        train_files: Files of the training stream, sorted.
        heldout_files: Held-out files, sorted.
        train_tokens: The training files' tokens, concatenated in order.
        heldout_streams: One token stream per held-out file.
        hash: :func:`corpus_hash` of every file read (training and held-out), in :data:`STDLIB_FILES` order.
    """

    train_files: list[str]
    heldout_files: list[str]
    train_tokens: Tensor
    heldout_streams: list[Tensor]
    hash: str


def load_corpus(
    files: tuple[str, ...] | list[str] = STDLIB_FILES,
    heldout: int = DEFAULT_HELDOUT_FILES,
    split_seed: int = 0,
    root: Path | str | None = None,
) -> StdlibCorpus:
    """Read the files, split them by file (:func:`split_files`) and tokenize them.

    Raises:
        FileNotFoundError: If a listed file is missing (see :func:`read_corpus`).
        ValueError: On a bad ``heldout``.
    """
    corpus = read_corpus(files, root)
    train, held = split_files(list(corpus), heldout, split_seed)
    return StdlibCorpus(
        train_files=train,
        heldout_files=held,
        train_tokens=torch.cat([encode(corpus[name]) for name in train]),
        heldout_streams=[encode(corpus[name]) for name in held],
        hash=corpus_hash(corpus),
    )


class StdlibTextDataModule(pl.LightningDataModule):
    """Training windows of the stdlib corpus in a fixed order, and its held-out windows.

    Window ``i`` of the training set depends only on ``seed`` (and the corpus), so any batch size or gradient
    accumulation that walks the windows in order sees the same tokens per optimizer step.

    Args:
        seq_len: Tokens per window.
        batch_size: Windows per training batch (the micro-batch under gradient accumulation).
        num_windows: Training windows in total (steps x windows per optimizer step; one epoch).
        seed: Seed of the training offsets.
        heldout: Files held out.
        split_seed: Seed of the file split (kept apart from ``seed`` so every training seed is evaluated on the same
            files).
        heldout_windows: How many held-out windows :meth:`heldout_batch` returns (evenly spaced; ``None``: all).
        files: The file list.
        root: Directory of the files (default: this interpreter's stdlib).
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        num_windows: int = 16_000,
        seed: int = 0,
        heldout: int = DEFAULT_HELDOUT_FILES,
        split_seed: int = 0,
        heldout_windows: int | None = 64,
        files: tuple[str, ...] | list[str] = STDLIB_FILES,
        root: str | None = None,
    ) -> None:
        super().__init__()
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(
                f"StdlibTextDataModule: seq_len and batch_size must be positive, got {seq_len}, {batch_size}"
            )
        self.save_hyperparameters()
        self.corpus: StdlibCorpus | None = None
        self.train_set: RandomWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and split the corpus (once)."""
        if self.corpus is None:
            hp = self.hparams
            self.corpus = load_corpus(hp.files, hp.heldout, hp.split_seed, hp.root)
            self.train_set = RandomWindows(self.corpus.train_tokens, hp.seq_len, hp.num_windows, hp.seed)

    def train_dataloader(self) -> DataLoader:
        """The training windows in index order (the offsets are already random), ``batch_size`` per batch."""
        self.setup()
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False, drop_last=True)

    def heldout_batch(self) -> tuple[Tensor, Tensor]:
        """All held-out windows at once: ``(input_ids, labels)``, each ``(windows, seq_len)``."""
        self.setup()
        return heldout_windows(self.corpus.heldout_streams, self.hparams.seq_len, self.hparams.heldout_windows)
