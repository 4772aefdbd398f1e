"""Distributed reliability on 2 CPU processes (gloo): ranks with different data decide the same, an unsafe pairing
stops every rank without a hang, and a rank that dies during a checkpoint save leaves no checkpoint that looks
complete. Scenarios run in ``_reliability_worker.py`` under torch.distributed.run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.strategies._launch import Launch, launch, rank_results

WORKER = Path(__file__).with_name("_reliability_worker.py")
HANG_TIMEOUT_S = 120  # the subprocess timeout; each scenario must finish well within it
WELL_WITHIN_S = 60

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Run a scenario once per module; return its launch (exit code, duration, output directory)."""
    cache: dict[str, Launch] = {}

    def run_(scenario: str) -> Launch:
        if scenario not in cache:
            out = tmp_path_factory.mktemp(scenario)
            (out / "tmp").mkdir()
            # TMPDIR inside the output: shows where fsspec's temporary file of an interrupted write ends up.
            cache[scenario] = launch(WORKER, scenario, out, timeout=HANG_TIMEOUT_S, env={"TMPDIR": str(out / "tmp")})
        return cache[scenario]

    return run_


# -- every rank decides the same, whatever its data ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "tensors", "elements"),
    [
        # FSDP2: counts use the global DTensor shape (3 blocks x (16x16 + 16) + head 16 + 1), not the local shard.
        ("agree_fsdp2", 8, 833),
        # DDP, bf16-true, head frozen on every rank: only the 3 blocks are judged.
        ("agree_ddp", 6, 816),
    ],
)
def test_ranks_with_different_data_record_the_same_verdict_and_contract(run, scenario, tensors, elements):
    rank0, rank1 = rank_results(run(scenario), scenario)
    for fit0, fit1 in zip(rank0["fits"], rank1["fits"], strict=True):
        assert fit0["data_checksum"] != fit1["data_checksum"]  # the premise: the ranks train on different data
        assert fit0["global_step"] == fit1["global_step"] == 2
        assert fit0["status"] == fit1["status"] == ["unsafe"]
        assert fit0["contract"] == fit1["contract"]
        assert (
            f"{tensors} trainable bfloat16 parameter tensors ({elements} elements)"
            in (fit0["contract"]["optimizers"][0]["message"])
        )
    assert rank0["fits"][0]["data_checksum"] != rank0["fits"][1]["data_checksum"]  # and different data per fit


@pytest.mark.parametrize("scenario", ["agree_fsdp2", "agree_ddp"])
def test_the_warning_is_emitted_on_rank_zero_only_once_over_two_fits(run, scenario):
    rank0, rank1 = rank_results(run(scenario), scenario)
    assert len(rank0["precision_warnings"]) == 1
    assert "torch.optim.adamw.AdamW" in rank0["precision_warnings"][0]
    assert rank1["precision_warnings"] == []


def test_unsafe_pairing_under_error_stops_every_ddp_rank_before_the_first_step_without_a_hang(run):
    job = run("error_ddp")
    rank0, rank1 = rank_results(job, "error_ddp")
    assert rank0["data_checksum"] != rank1["data_checksum"]
    for rank in (rank0, rank1):
        assert rank["raised"] == "PrecisionPairingError"
        assert rank["global_step"] == 0 and rank["losses"] == []
        assert "torch.optim.adamw.AdamW" in rank["message"] and "on_unsafe='error'" in rank["message"]
    assert job.seconds < WELL_WITHIN_S, job.describe()


def test_fp32_accumulation_under_ddp_is_refused_on_every_rank_before_the_first_step(run):
    job = run("accumulate_fp32_ddp")
    for rank in rank_results(job, "accumulate_fp32_ddp"):
        assert rank["raised"] == "PrecisionConfigError" and rank["global_step"] == 0
        assert "replicated over 2 processes" in rank["message"] and "strategy='fsdp2'" in rank["message"]
    assert job.seconds < WELL_WITHIN_S, job.describe()


# -- a rank dies during a checkpoint save -----------------------------------------------------------------------------


def _died_as_planned(job: Launch, rank: int, what: str) -> None:
    assert job.returncode != 0, job.describe()
    assert f"rank {rank}: {what}" in job.stderr, job.describe()
    assert job.seconds < WELL_WITHIN_S, job.describe()  # the surviving rank did not hang on the dead one


def _load_sharded(path: Path) -> dict[str, Any]:
    """Load a distributed checkpoint directory in this single process (raises if it is not complete)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        return torch.load(Path(tmp) / "full.pt", weights_only=False)


def _meta(path: Path) -> dict[str, Any]:
    """Lightning's part of a checkpoint: ``meta.pt`` of a directory, or the whole file."""
    return torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False)


def _model_checkpoint_state(meta: dict[str, Any]) -> dict[str, Any]:
    (state,) = [s for key, s in meta["callbacks"].items() if key.startswith("ModelCheckpoint")]
    return state


def _visible(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))


def _same_tensors(a: Any, b: Any) -> bool:
    """Bitwise equality of nested dicts of tensors (and plain values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_rank_dying_in_a_sharded_save_leaves_no_complete_looking_checkpoint(run):
    job = run("die_sharded_new")
    ckpts = job.out / "ckpts"
    _died_as_planned(job, 1, "dies in distributed checkpoint write #3")
    # The step-4 save never reached its name; what rank 0 wrote is in a hidden staging directory without DCP's
    # .metadata (written only after every rank has written) and without Lightning's meta.pt.
    assert _visible(ckpts) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    staging = ckpts / ".epoch=0-step=4.ckpt.incomplete"
    assert not (staging / ".metadata").exists() and not (staging / "meta.pt").exists()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    with pytest.raises(CheckpointException, match="No such file.*metadata"):
        _load_sharded(staging)
    # ModelCheckpoint's last record is the step-2 save, complete and loadable.
    meta = _meta(ckpts / "last.ckpt")
    assert meta["global_step"] == 2
    state = _model_checkpoint_state(meta)
    assert Path(state["best_model_path"]).name == "epoch=0-step=2.ckpt"
    assert Path(state["last_model_path"]).name == "last.ckpt"
    assert _same_tensors(
        _load_sharded(ckpts / "last.ckpt")["state_dict"], _load_sharded(ckpts / "epoch=0-step=2.ckpt")["state_dict"]
    )


def test_rank_dying_while_last_ckpt_is_rewritten_keeps_the_previous_last_intact(run):
    # Without staging, Lightning rewrites last.ckpt in place: the old .metadata and meta.pt (step 2) stayed next to
    # rank 0's new shard (step 4) and rank 1's old one, and the directory loaded as a mix of two steps.
    job = run("die_sharded_last")
    ckpts = job.out / "ckpts"
    _died_as_planned(job, 1, "dies in distributed checkpoint write #4")
    assert _visible(ckpts) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert _meta(ckpts / "epoch=0-step=4.ckpt")["global_step"] == 4
    assert _meta(ckpts / "last.ckpt")["global_step"] == 2
    last = _load_sharded(ckpts / "last.ckpt")
    step2 = _load_sharded(ckpts / "epoch=0-step=2.ckpt")
    step4 = _load_sharded(ckpts / "epoch=0-step=4.ckpt")
    assert _same_tensors(last["state_dict"], step2["state_dict"])
    assert not _same_tensors(step2["state_dict"], step4["state_dict"])  # so the comparison can tell them apart
    assert _same_tensors(last["optimizer_0"]["state"], step2["optimizer_0"]["state"])
    assert not (ckpts / ".last.ckpt.incomplete" / ".metadata").exists()


def test_rank_zero_dying_mid_write_of_a_full_file_leaves_no_truncated_checkpoint(run):
    job = run("die_full_file")
    ckpts = job.out / "ckpts"
    _died_as_planned(job, 0, "dies after writing")
    assert _visible(ckpts) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []
    assert _meta(ckpts / "last.ckpt")["global_step"] == 2
    assert _meta(ckpts / "epoch=0-step=2.ckpt")["global_step"] == 2
    # Lightning's fsspec transaction wrote into a temporary file under TMPDIR; the half-written bytes stay there.
    leftovers = [p for p in (job.out / "tmp").iterdir() if p.is_file()]
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < os.path.getsize(ckpts / "last.ckpt")
