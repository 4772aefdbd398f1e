"""Resume scenarios for FSDP2Strategy across storage dtypes and optimizers, run under ``torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 _fsdp2_resume_worker.py SCENARIO OUT_DIR``. Each scenario
runs several save/resume pairs in one launch; each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with what it
observed, and ``test_fsdp2_resume_distributed.py`` asserts on those files. Not a test module itself.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from lightning_precision import FSDP2Strategy, PrecisionWarning
from lightning_precision._logging import reset_reported
from lightning_precision.dtypes import dtype_name
from tests._worker_exit import finish
from tests.strategies._fsdp2_worker import CompensatedBlocks, MultiBlock, loader, trainer

COMPENSATED = "lightning_precision.optim.CompensatedAdamW"
# (strategy options, precision, module class) of each run.
BF16_COMPENSATED = ({"optimizer": COMPENSATED}, "bf16-true", CompensatedBlocks)
FP32_COMPENSATED = ({"optimizer": COMPENSATED, "storage_dtype": "float32"}, "bf16-mixed", CompensatedBlocks)
FP32_ADAMW = ({}, "bf16-mixed", MultiBlock)
BF16_ADAMW = ({}, "bf16-true", MultiBlock)


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's shards of every parameter (key ``"param"``) and of its optimizer state."""
    out = {}
    for name, p in module.named_parameters():
        state = optimizer.state.get(p, {})
        out[name] = {"param": _local(p), **{k: _local(v) for k, v in state.items() if k != "step"}}
    return out


class _Capture(pl.Callback):
    """The loaded state, before the first step of the resumed run."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = _snapshot(pl_module, trainer.optimizers[0])


class _Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _save(out: Path, name: str, run: tuple, distributed: bool = True, edit: Callable | None = None) -> Path:
    """Fit 2 steps and save; ``edit(module, optimizer)`` may change the state first. Returns the checkpoint."""
    options, precision, cls = run
    module = cls()
    strategy = FSDP2Strategy(on_unsafe="ignore", save_distributed_checkpoint=distributed, **options)
    t = trainer(strategy, out, steps=2, precision=precision)
    t.fit(module, loader(n=8))
    if edit is not None:
        edit(module, t.optimizers[0])
    path = out / f"{name}.ckpt"
    t.save_checkpoint(path)
    torch.save(_snapshot(module, t.optimizers[0]), out / f"{name}.rank{dist.get_rank()}.pt")
    return path


def _resume(out: Path, path: Path, run: tuple) -> dict[str, Any]:
    """Resume ``path`` under ``run`` for one step; what was loaded, logged and warned, or what was raised."""
    options, precision, cls = run
    reset_reported()  # each resume is reported as in a fresh process
    logs = _Logs()
    logging.getLogger("lightning_precision").addHandler(logs)
    capture = _Capture()
    t = trainer(FSDP2Strategy(on_unsafe="ignore", **options), out, steps=3, precision=precision, callbacks=[capture])
    result: dict[str, Any] = {"raised": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t.fit(cls(), loader(n=8), ckpt_path=str(path))
        except Exception as err:  # noqa: BLE001 - reported to the test, which names what it expects
            result.update(raised=type(err).__name__, message=str(err))
    logging.getLogger("lightning_precision").removeHandler(logs)
    result["logs"] = logs.lines
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    result["loaded"] = capture.seen
    return result


def _saved(out: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / f"{name}.rank{dist.get_rank()}.pt")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of a resume's result (tensors compared by the scenario itself)."""
    loaded = result.pop("loaded")
    first = next(iter(loaded.values()), {})
    return {
        **result,
        "storage": sorted({dtype_name(s["param"].dtype) for s in loaded.values()}),
        "state": {k: dtype_name(v.dtype) for k, v in first.items() if k != "param"},
    }


def _folded_exactly(saved: dict, loaded: dict) -> bool:
    """Each fp32 shard is exactly p + c of the saved bf16 shards (the sum of two bf16 values, computed in fp32)."""
    return all(
        n in loaded and torch.equal(loaded[n]["param"], s["param"].float() + s["compensation"].float())
        for n, s in saved.items()
    )


def _seeded(saved: dict, loaded: dict) -> bool:
    """Each bf16 shard is the fp32 shard rounded, and its compensation the residual rounded to bf16."""
    return all(
        n in loaded
        and torch.equal(loaded[n]["param"], s["param"].bfloat16())
        and torch.equal(loaded[n]["compensation"], (s["param"] - s["param"].bfloat16().float()).bfloat16())
        for n, s in saved.items()
    )


def scenario_storage(out: Path) -> dict[str, Any]:
    """A2 and A4: CompensatedAdamW across storage dtypes; checkpoints whose metadata is missing or wrong."""
    result: dict[str, Any] = {}
    bf16 = _save(out, "bf16", BF16_COMPENSATED)
    widen = _resume(out, bf16, FP32_COMPENSATED)
    result["widen_exact"] = _folded_exactly(_saved(out, "bf16"), widen["loaded"])
    result["widen"] = _summary(widen)
    bf16_file = _save(out, "bf16_file", BF16_COMPENSATED, distributed=False)  # one full file, sharded on load
    result["widen_full_file_exact"] = _folded_exactly(
        _saved(out, "bf16_file"), _resume(out, bf16_file, FP32_COMPENSATED)["loaded"]
    )

    fp32 = _save(out, "fp32", FP32_COMPENSATED)
    narrow = _resume(out, fp32, BF16_COMPENSATED)
    result["narrow_seeded"] = _seeded(_saved(out, "fp32"), narrow["loaded"])
    result["narrow"] = _summary(narrow)

    adamw = _save(out, "adamw", FP32_ADAMW)
    metadata = adamw / "meta.pt"
    if dist.get_rank() == 0:  # a plain Lightning checkpoint: no record of the strategy's dtypes
        checkpoint = torch.load(metadata, weights_only=False)
        checkpoint.pop("lightning_precision_fsdp2")
        torch.save(checkpoint, metadata)
    dist.barrier()
    result["no_record"] = _summary(_resume(out, adamw, BF16_ADAMW))
    if dist.get_rank() == 0:  # hand-edited: the record claims the weights are bf16
        checkpoint = torch.load(metadata, weights_only=False)
        checkpoint["lightning_precision_fsdp2"] = {"storage_dtype": "bfloat16"}
        torch.save(checkpoint, metadata)
    dist.barrier()
    result["edited_record"] = _summary(_resume(out, adamw, BF16_ADAMW))
    return result


def scenario_switch(out: Path) -> dict[str, Any]:
    """A3 and A5: the optimizer switched on resume; corrupt and misshapen state refused on every rank."""
    result: dict[str, Any] = {}
    adamw = _save(out, "adamw", FP32_ADAMW)
    to_compensated = _resume(out, adamw, BF16_COMPENSATED)
    saved = _saved(out, "adamw")
    result["to_compensated_seeded"] = _seeded(saved, to_compensated["loaded"])
    result["to_compensated_moments"] = all(
        n in to_compensated["loaded"]
        and torch.equal(to_compensated["loaded"][n]["exp_avg"], s["exp_avg"].bfloat16())
        and torch.equal(to_compensated["loaded"][n]["exp_avg_sq"], s["exp_avg_sq"].bfloat16())
        for n, s in saved.items()
    )
    result["to_compensated"] = _summary(to_compensated)

    bf16 = _save(out, "bf16", BF16_COMPENSATED)
    to_adamw = _resume(out, bf16, FP32_ADAMW)
    saved = _saved(out, "bf16")
    result["to_adamw_folded"] = _folded_exactly(saved, to_adamw["loaded"])
    result["to_adamw_moments"] = all(
        n in to_adamw["loaded"] and torch.equal(to_adamw["loaded"][n]["exp_avg"], s["exp_avg"].float())
        for n, s in saved.items()
    )
    result["to_adamw"] = _summary(to_adamw)
    result["to_bf16_adamw"] = _summary(_resume(out, bf16, BF16_ADAMW))

    def corrupt(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # One fault on each rank's own shard: every rank must still refuse.
        with torch.no_grad():
            if dist.get_rank() == 1:
                optimizer.state[module.blocks[0].fc.weight]["exp_avg"].to_local()[0, 0] = float("nan")
            else:
                optimizer.state[module.blocks[1].fc.weight]["exp_avg_sq"].to_local()[0, 0] = -1.0

    result["corrupt"] = _summary(_resume(out, _save(out, "corrupt", FP32_ADAMW, edit=corrupt), FP32_ADAMW))

    full = _save(out, "full", FP32_ADAMW, distributed=False)
    if dist.get_rank() == 0:  # the moments of one parameter replaced by ones of another shape
        checkpoint = torch.load(full, weights_only=False)
        checkpoint["optimizer_states"][0]["state"][0]["exp_avg"] = torch.zeros(16, 8)
        torch.save(checkpoint, full)
    dist.barrier()
    result["misshapen"] = _summary(_resume(out, full, FP32_ADAMW))
    return result


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning_precision").setLevel(logging.INFO)
    result = globals()[f"scenario_{scenario}"](out)
    finish(out, scenario, int(os.environ.get("RANK", "0")), result)


if __name__ == "__main__":
    main()
