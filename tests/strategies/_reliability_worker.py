"""Distributed reliability scenarios, run under ``torch.distributed.run`` (one process per rank).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 _reliability_worker.py SCENARIO OUT_DIR``.
Ranks that survive write ``OUT_DIR/<scenario>.rank<r>.json``; the ``die_*`` scenarios kill a rank during a checkpoint
save, and the test inspects what is left on disk. Not a test module (Lightning's launcher re-executes ``sys.argv``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from _fsdp2_worker import Blocks, MultiBlock, trainer

from lightning_precision import (
    FSDP2Strategy,
    PrecisionConfigError,
    PrecisionGuard,
    PrecisionPairingError,
    PrecisionWarning,
)
from tests._worker_exit import finish

RANK = int(os.environ.get("RANK", "0"))


class RankData(Blocks):
    """Different samples on every rank (seeded by rank and fit), on top of the distributed sampler's split."""

    def __init__(self, seed: int, n: int = 16) -> None:
        super().__init__(n)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn_like(self.x).normal_(generator=g)
        self.audio = torch.randn_like(self.audio).normal_(generator=g)
        self.y = torch.randn_like(self.y).normal_(generator=g)


def rank_loader(fit: int) -> tuple[DataLoader, float]:
    data = RankData(seed=1000 * RANK + fit)
    return DataLoader(data, batch_size=2, shuffle=False), float(data.x.sum())


# -- agreement: every rank decides the same from config and dtypes, whatever its data ---------------------------------


def _agree(out: Path, make_strategy: Any, precision: str, freeze_head: bool) -> dict[str, Any]:
    fits = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fit in range(2):  # two consecutive fits in one process: the warning is once per cause per process
            module = MultiBlock()  # same initial weights on every rank
            if freeze_head:  # the same frozen parameters on every rank (a per-rank mix would be a user bug)
                module.head.requires_grad_(False)
            guard = PrecisionGuard(on_unsafe="warn", log_table=False)
            t = trainer(make_strategy(), out, steps=2, precision=precision, callbacks=[guard])
            data, checksum = rank_loader(fit)
            t.fit(module, data)
            fits.append(
                {
                    "contract": guard.contract.to_dict(),
                    "status": [row["verdict"] for row in guard.contract.to_dict()["optimizers"]],
                    "data_checksum": checksum,
                    "global_step": t.global_step,
                }
            )
    return {
        "fits": fits,
        "precision_warnings": [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)],
    }


def scenario_agree_fsdp2(out: Path) -> dict[str, Any]:
    # bf16 storage with torch AdamW: unsafe, judged by the strategy (after sharding) and by the guard (fit start).
    return _agree(out, lambda: FSDP2Strategy(storage_dtype="bfloat16", on_unsafe="warn"), "bf16-mixed", False)


def scenario_agree_ddp(out: Path) -> dict[str, Any]:
    # Lightning's own DDP and bf16-true: only the guard judges; the head is frozen on every rank.
    return _agree(out, lambda: "ddp", "bf16-true", True)


def scenario_error_ddp(out: Path) -> dict[str, Any]:
    module = MultiBlock()
    guard = PrecisionGuard(on_unsafe="error", log_table=False)
    t = trainer("ddp", out, steps=2, precision="bf16-true", callbacks=[guard])
    data, checksum = rank_loader(0)
    start = time.monotonic()
    try:
        t.fit(module, data)
    except PrecisionPairingError as err:
        return {
            "raised": type(err).__name__,
            "message": str(err),
            "global_step": t.global_step,
            "losses": module.losses,
            "seconds_in_fit": time.monotonic() - start,
            "data_checksum": checksum,
        }
    return {"raised": None, "global_step": t.global_step, "data_checksum": checksum}


# -- a rank dies during a checkpoint save ---------------------------------------------------------------------------


def _die(message: str) -> None:
    print(f"rank {RANK}: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _die_in_dcp_write(on_call: int) -> None:
    """On this rank, the ``on_call``-th distributed-checkpoint write kills the process before it writes its shard."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data
    calls = {"n": 0}

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == on_call:
            _die(f"dies in distributed checkpoint write #{on_call} into {self.path}")
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data


def _die_in_file_write(on_call: int) -> None:
    """On this rank, the ``on_call``-th checkpoint file write writes half its bytes, then kills the process."""
    from fsspec.implementations.local import LocalFileOpener

    original = LocalFileOpener.write
    calls = {"n": 0}

    def write(self: Any, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == on_call:
            original(self, data[: len(data) // 2])
            self.f.flush()
            _die(f"dies after writing {len(data) // 2} of {len(data)} bytes of checkpoint write #{on_call}")
        return original(self, data)

    LocalFileOpener.write = write


def _checkpointing_run(out: Path, distributed: bool) -> None:
    """Saves at steps 2 and 4: each save writes the step's checkpoint, then rewrites ``last.ckpt``."""
    callback = ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=True)
    strategy = FSDP2Strategy(save_distributed_checkpoint=distributed)
    t = trainer(strategy, out, steps=4, callbacks=[callback], enable_checkpointing=True)
    t.fit(MultiBlock(), DataLoader(Blocks(16), batch_size=2))


def scenario_die_sharded_new(out: Path) -> dict[str, Any]:
    if RANK == 1:
        _die_in_dcp_write(on_call=3)  # step 2: step=2 (1), last (2); step 4: step=4 (3) <- dies
    _checkpointing_run(out, distributed=True)
    return {}


def scenario_die_sharded_last(out: Path) -> dict[str, Any]:
    if RANK == 1:
        _die_in_dcp_write(on_call=4)  # step 4: step=4 (3), rewriting last.ckpt (4) <- dies
    _checkpointing_run(out, distributed=True)
    return {}


def scenario_die_full_file(out: Path) -> dict[str, Any]:
    if RANK == 0:  # only rank 0 writes the full file
        _die_in_file_write(on_call=3)  # step 2: step=2 (1), last (2); step 4: step=4 (3) <- dies mid-write
    _checkpointing_run(out, distributed=False)
    return {}


def scenario_accumulate_fp32_ddp(out: Path) -> dict[str, Any]:
    """fp32 accumulation buffers under DDP would leave the buffered micro-batches unreduced: refused on every rank."""
    from lightning_precision import HalfPrecisionForAudio

    module = MultiBlock()
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    t = trainer("ddp", out, steps=2, precision=None, plugins=[plugin], accumulate_grad_batches=2)
    try:
        t.fit(module, rank_loader(0)[0])
    except PrecisionConfigError as err:
        return {"raised": type(err).__name__, "message": str(err), "global_step": t.global_step}
    return {"raised": None, "global_step": t.global_step}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    result = globals()[f"scenario_{scenario}"](out)
    finish(out, scenario, RANK, result)


if __name__ == "__main__":
    main()
