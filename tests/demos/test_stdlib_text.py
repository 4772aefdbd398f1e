"""Tests of the standard-library text corpus (lightning_precision.demos.stdlib_text)."""

from __future__ import annotations

import pytest
import torch

from lightning_precision.demos import (
    STDLIB_FILES,
    VOCAB_SIZE,
    RandomWindows,
    StdlibTextDataModule,
    corpus_hash,
    encode,
    heldout_windows,
    load_corpus,
    read_corpus,
    split_files,
    stdlib_dir,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_every_listed_file_exists_in_this_interpreter():
    assert list(STDLIB_FILES) == sorted(STDLIB_FILES)
    assert all((stdlib_dir() / name).is_file() for name in STDLIB_FILES)


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_files(seed=3)
    assert (train, held) == split_files(seed=3)
    assert (train, held) != split_files(seed=4)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(STDLIB_FILES)
    assert split_files(list(reversed(STDLIB_FILES)), seed=3) == (train, held)  # input order does not matter


@pytest.mark.parametrize("heldout", [0, len(STDLIB_FILES)])
def test_split_rejects_a_heldout_count_out_of_range(heldout):
    with pytest.raises(ValueError, match=f"got {heldout}"):
        split_files(heldout=heldout)


def test_heldout_bytes_are_never_in_the_training_stream(corpus):
    train = bytes(corpus.train_tokens.to(torch.uint8).tolist())
    for name, stream in zip(corpus.heldout_files, corpus.heldout_streams):
        assert name not in corpus.train_files
        assert bytes(stream[:4096].to(torch.uint8).tolist()) not in train  # a file's opening is not in training


def test_tokens_are_bytes(corpus):
    assert corpus.train_tokens.dtype == torch.int64
    assert 0 <= int(corpus.train_tokens.min()) and int(corpus.train_tokens.max()) < VOCAB_SIZE
    assert encode(b"\x00\xffA").tolist() == [0, 255, 65]


def test_windows_are_shaped_and_shifted_and_the_same_for_the_same_seed(corpus):
    a = RandomWindows(corpus.train_tokens, seq_len=32, num_windows=10, seed=1)
    b = RandomWindows(corpus.train_tokens, seq_len=32, num_windows=10, seed=1)
    c = RandomWindows(corpus.train_tokens, seq_len=32, num_windows=10, seed=2)
    x, y = a[7]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(10))
    assert not torch.equal(a.offsets, c.offsets)


def test_heldout_windows_are_fixed_chunks_of_heldout_files(corpus):
    x, y = heldout_windows(corpus.heldout_streams, seq_len=64, max_windows=16)
    assert x.shape == y.shape == (16, 64) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = heldout_windows(corpus.heldout_streams, seq_len=64, max_windows=16)
    assert torch.equal(x, x2)
    first = corpus.heldout_streams[0][:65]
    assert torch.equal(heldout_windows(corpus.heldout_streams, 64)[0][0], first[:-1])


def test_datamodule_batches_do_not_depend_on_the_micro_batch_size():
    whole = StdlibTextDataModule(seq_len=16, batch_size=8, num_windows=16, seed=0)
    halves = StdlibTextDataModule(seq_len=16, batch_size=4, num_windows=16, seed=0)
    a = torch.cat([x for x, _ in whole.train_dataloader()])
    b = torch.cat([x for x, _ in halves.train_dataloader()])
    assert a.shape == (16, 16) and torch.equal(a, b)
    hx, hy = whole.heldout_batch()
    assert hx.shape[1] == 16 and hx.dtype == hy.dtype == torch.int64


def test_hash_names_the_bytes_read(corpus):
    files = read_corpus(STDLIB_FILES[:3])
    assert corpus_hash(files) == corpus_hash(dict(files))
    changed = {**files, STDLIB_FILES[0]: files[STDLIB_FILES[0]] + b"#"}
    assert corpus_hash(changed) != corpus_hash(files)
    assert len(corpus.hash) == 16


def test_a_missing_file_is_named(tmp_path):
    (tmp_path / "present.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 .*\['gone/missing.py'\]") as err:
        read_corpus(["present.py", "gone/missing.py", "present.py"], root=tmp_path)
    assert str(tmp_path) in str(err.value)
