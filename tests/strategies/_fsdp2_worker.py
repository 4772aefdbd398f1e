"""Distributed scenarios for FSDP2Strategy, run under ``torch.distributed.run`` (one process per rank).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 _fsdp2_worker.py SCENARIO OUT_DIR``.
Each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with what it observed; the pytest tests assert on those files.
Not a test module itself (Lightning's launcher re-executes ``sys.argv``, which must not be pytest).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from lightning_precision import FSDP2Strategy, PrecisionPairingError, PrecisionWarning
from lightning_precision.dtypes import dtype_name
from tests._worker_exit import finish

DIM, BLOCKS, STEPS = 16, 3, 4


class Blocks(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, DIM, generator=g)
        self.audio = torch.randn(n, DIM, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "audio_signal": self.audio[i], "y": self.y[i]}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class MultiBlock(pl.LightningModule):
    """Several blocks in a ModuleList and a head; no ``configure_model``: the strategy shards it."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, 1)
        self.lr = lr
        self.inside: list[dict[str, str]] = []
        self.seen_batch: dict[str, str] = {}
        self.losses: list[float] = []
        self.batches: list[tuple[int, int]] = []
        self.blocks[0].fc.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.inside.append(
            {
                "weight": dtype_name(module.weight.dtype),
                "input": dtype_name(inputs[0].dtype),
                "output": dtype_name(output.dtype),
            }
        )

    def on_train_start(self) -> None:
        # Right after a resume: are the loaded fp32 values exactly bf16 values (an exact upcast)?
        shards = [p.to_local() if isinstance(p, DTensor) else p for p in self.parameters()]
        self.bf16_representable_at_start = all(torch.equal(s, s.bfloat16().to(s.dtype)) for s in shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen_batch = {k: dtype_name(v.dtype) for k, v in batch.items()}
        out = self(batch["x"] + batch["audio_signal"].to(batch["x"].dtype))
        loss = nn.functional.mse_loss(out.float(), batch["y"].float())
        synced = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")
        self.losses.append(float(synced))
        self.batches.append((self.current_epoch, batch_idx))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def trainer(strategy: FSDP2Strategy, out: Path, steps: int = STEPS, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        "strategy": strategy,
        "precision": "bf16-mixed",
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(out),
    }
    return pl.Trainer(**{**defaults, **kwargs})


def loader(n: int = 16, batch_size: int = 2) -> DataLoader:
    return DataLoader(Blocks(n), batch_size=batch_size, shuffle=False)


def local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def full_state(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (gathered) parameters and optimizer moments as lists, for exact comparison across runs."""
    out = {}
    for name, p in module.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[f"param/{name}"] = full.detach().float().flatten().tolist()
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "compensation"):  # compensation: CompensatedAdamW's Kahan buffer
            if key in state:
                s = state[key]
                s = s.full_tensor() if isinstance(s, DTensor) else s
                out[f"{key}/{name}"] = s.detach().float().flatten().tolist()
    return out


# -- scenarios -----------------------------------------------------------------------------------------------------


def scenario_fit(out: Path) -> dict[str, Any]:
    module = MultiBlock()
    t = trainer(FSDP2Strategy(), out)
    t.fit(module, loader())
    opt = t.optimizers[0]
    w = module.blocks[0].fc.weight
    state = opt.state[w]
    probe = torch.linspace(-1, 1, 4 * DIM).reshape(4, DIM)
    with torch.no_grad():
        probe_loss = float(module(probe).float().pow(2).mean())  # a forward through the FSDP root, every rank
    fsdp_state = module.blocks[0]._get_fsdp_state()
    return {
        "is_dtensor": all(isinstance(p, DTensor) for p in module.parameters()),
        "mesh_size": w.device_mesh.size(),
        "placements": [str(pl_) for pl_ in w.placements],
        "local_rows": w.to_local().shape[0],
        "global_rows": w.shape[0],
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "exp_avg": dtype_name(state["exp_avg"].dtype),
        "exp_avg_sq": dtype_name(state["exp_avg_sq"].dtype),
        "inside": module.inside[-1],
        "batch": module.seen_batch,
        "policy_reduce": dtype_name(fsdp_state._mp_policy.reduce_dtype),
        "policy_param": dtype_name(fsdp_state._mp_policy.param_dtype),
        "strategy_reduce": dtype_name(t.strategy.reduce_dtype),
        "strategy_compute": dtype_name(t.strategy.compute_dtype),
        "strategy_storage": dtype_name(t.strategy.storage_dtype),
        "autocast_plugin": type(t.strategy.precision_plugin).__name__,
        "precision": t.precision,
        "losses": module.losses,
        "probe_loss": probe_loss,
        "sharded_by_strategy": t.strategy.sharded_by_strategy,
    }


def scenario_unsafe_error(out: Path) -> dict[str, Any]:
    module = MultiBlock()
    t = trainer(FSDP2Strategy(storage_dtype="bfloat16", on_unsafe="error"), out, precision="bf16-mixed")
    try:
        t.fit(module, loader())
    except PrecisionPairingError as err:
        return {"raised": type(err).__name__, "message": str(err), "global_step": t.global_step}
    return {"raised": None, "global_step": t.global_step}


def _resume_run(
    out: Path, strategy_kwargs: dict[str, Any], steps: int, ckpt: str | None, save_every: int = 0
) -> tuple[MultiBlock, pl.Trainer]:
    """Train to ``steps`` (8 samples / (2 ranks x batch 2) = 2 steps per epoch), optionally resuming from ``ckpt``.

    With ``save_every``, a ModelCheckpoint saves during training (Lightning's usual resume path, whose loop state
    resumes at the right batch); a ``trainer.save_checkpoint`` after ``fit`` returns does not restore the loop position.
    """
    module = MultiBlock()
    callbacks = []
    if save_every:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=save_every, save_top_k=-1, save_last=False)
        )
    t = trainer(
        FSDP2Strategy(**strategy_kwargs), out, steps=steps, callbacks=callbacks, enable_checkpointing=bool(save_every)
    )
    t.fit(module, loader(n=8), ckpt_path=ckpt)
    return module, t


def scenario_resume(out: Path, distributed: bool = True) -> dict[str, Any]:
    n = 4
    kwargs = {"save_distributed_checkpoint": distributed}
    ref, t_ref = _resume_run(out, kwargs, 2 * n, None, save_every=n)  # the uninterrupted run saves at step n
    reference = full_state(ref, t_ref.optimizers[0])
    path = next((out / "ckpts").glob(f"*step={n}*"))
    resumed_module, t2 = _resume_run(out, kwargs, 2 * n, str(path))
    resumed = full_state(resumed_module, t2.optimizers[0])
    diffs = {k: max(abs(a - b) for a, b in zip(reference[k], resumed[k])) for k in reference}
    return {
        "checkpoint": path.name,
        "checkpoint_is_dir": path.is_dir(),
        "global_step": t2.global_step,
        "ref_step": t_ref.global_step,
        "ref_batches": ref.batches,
        "resumed_batches": resumed_module.batches,
        "keys": sorted(reference),
        "max_abs_diff": max(diffs.values()),
        "bitwise": all(reference[k] == resumed[k] for k in reference),
    }


def scenario_contract_dir(out: Path) -> dict[str, Any]:
    from lightning_precision import PrecisionGuard, read_precision_contract

    checkpoints = ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=False)
    t = trainer(FSDP2Strategy(), out, steps=2, callbacks=[PrecisionGuard(), checkpoints], enable_checkpointing=True)
    t.fit(MultiBlock(), loader(n=8))
    path = next((out / "ckpts").glob("*step=2*"))
    contract = read_precision_contract(path)
    return {
        "checkpoint_is_dir": path.is_dir(),
        "storage": [row.storage_dtype for row in contract.optimizers],
        "compute": contract.compute_dtype,
        "reduce": contract.reduce_dtype,
    }


def scenario_resume_full_file(out: Path) -> dict[str, Any]:
    return scenario_resume(out, distributed=False)


def _cross(out: Path, saved: str, resumed: str) -> dict[str, Any]:
    lp_log = logging.getLogger("lightning_precision")
    lp_log.setLevel(logging.INFO)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    lp_log.addHandler(Keep())
    kwargs = {"on_unsafe": "ignore"}
    _resume_run(out, {**kwargs, "storage_dtype": saved}, 2, None, save_every=2)
    path = next((out / "ckpts").glob("*step=2*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second, t2 = _resume_run(out, {**kwargs, "storage_dtype": resumed}, 4, str(path))
    return {
        "storage": sorted({dtype_name(p.dtype) for p in second.parameters()}),
        "exp_avg": dtype_name(t2.optimizers[0].state[second.blocks[0].fc.weight]["exp_avg"].dtype),
        "bf16_representable_at_start": second.bf16_representable_at_start,
        "resume_logs": [r for r in records if "Resumed" in r],
        "precision_warnings": [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)],
        "global_step": t2.global_step,
    }


def scenario_cross_upcast(out: Path) -> dict[str, Any]:
    return _cross(out, "bfloat16", "float32")


def scenario_cross_downcast(out: Path) -> dict[str, Any]:
    return _cross(out, "float32", "bfloat16")


def scenario_plugins(out: Path) -> dict[str, Any]:
    """True and flash half precision: storage cast before sharding, shards never re-cast, audio inputs kept fp32."""
    from lightning_precision import FlashPrecision, HalfPrecisionForAudio

    result = {}
    for name, plugin in (
        ("bf16-true", HalfPrecisionForAudio("bf16-true", on_unsafe="ignore")),
        ("bf16-flash", FlashPrecision("bf16-flash", on_unsafe="ignore")),
    ):
        module = MultiBlock()
        t = trainer(FSDP2Strategy(on_unsafe="ignore"), out, steps=2, precision=None, plugins=[plugin])
        t.fit(module, loader())
        result[name] = {
            "is_dtensor": all(isinstance(p, DTensor) for p in module.parameters()),
            "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
            "strategy_storage": dtype_name(t.strategy.storage_dtype),
            "batch": module.seen_batch,
            "inside": module.inside[-1],
            "losses_finite": all(torch.isfinite(torch.tensor(module.losses)).tolist()),
        }
    return result


def scenario_fp32_modules(out: Path) -> dict[str, Any]:
    """bf16-true storage with the head kept in fp32: its own fp32 unit, fp32 inputs inside, bf16 handed on."""
    from lightning_precision import HalfPrecisionForAudio, PrecisionGuard

    module = MultiBlock()
    seen: dict[str, str] = {}
    module.head.register_forward_hook(
        lambda m, args, output: seen.update(input=dtype_name(args[0].dtype), output=dtype_name(output.dtype))
    )
    guard = PrecisionGuard(on_unsafe="ignore", log_table=False)
    strategy = FSDP2Strategy(on_unsafe="ignore", fp32_modules=["head"])
    t = trainer(strategy, out, steps=2, precision=None, plugins=[HalfPrecisionForAudio("bf16-true")], callbacks=[guard])
    t.fit(module, loader())
    return {
        "head_storage": sorted({dtype_name(p.dtype) for p in module.head.parameters()}),
        "block_storage": sorted({dtype_name(p.dtype) for p in module.blocks.parameters()}),
        "head_is_dtensor": all(isinstance(p, DTensor) for p in module.head.parameters()),
        "head_seen": seen,
        "contract_fp32_modules": guard.contract.fp32_modules,
        "losses_finite": all(torch.isfinite(torch.tensor(module.losses)).tolist()),
    }


class CompensatedBlocks(MultiBlock):
    """The library's low-memory FSDP2 recipe: bf16 storage chosen by "auto" for CompensatedAdamW."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning_precision.optim import CompensatedAdamW

        return CompensatedAdamW(self.parameters(), lr=self.lr)


def _compensated_trainer(out: Path, steps: int) -> pl.Trainer:
    strategy = FSDP2Strategy(optimizer="lightning_precision.optim.CompensatedAdamW")
    return trainer(strategy, out, steps=steps)


def _state_dtypes(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    state = optimizer.state[module.blocks[0].fc.weight]
    return {k: dtype_name(v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"}


def scenario_compensated_save(out: Path) -> dict[str, Any]:
    """Fit with CompensatedAdamW under FSDP2 and save a sharded checkpoint, with the full state beside it."""
    module = CompensatedBlocks()
    t = _compensated_trainer(out, steps=2)
    t.fit(module, loader(n=8))
    t.save_checkpoint(out / "compensated.ckpt")
    saved = full_state(module, t.optimizers[0])
    if t.is_global_zero:
        (out / "compensated_state.json").write_text(json.dumps(saved))
    return {
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "state": _state_dtypes(module, t.optimizers[0]),
    }


def scenario_compensated_resume(out: Path) -> dict[str, Any]:
    """Load that checkpoint on this world size and compare what was restored with what was saved."""
    module = CompensatedBlocks()
    t = _compensated_trainer(out, steps=3)
    restored: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            restored.update(full_state(pl_module, trainer.optimizers[0]))

    t.callbacks.append(Capture())
    t.fit(module, loader(n=8), ckpt_path=str(out / "compensated.ckpt"))
    saved = json.loads((out / "compensated_state.json").read_text())
    return {
        "world_size": t.world_size,
        "restored_exactly": saved == {k: restored[k] for k in saved},
        "keys": sorted(saved),
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "state": _state_dtypes(module, t.optimizers[0]),
    }


def scenario_accumulate_fp32(out: Path) -> dict[str, Any]:
    """bf16 storage ("auto" for CompensatedAdamW), 4 micro-batches per step summed in fp32 buffers by the strategy."""
    micro: list[dict[str, torch.Tensor]] = []
    handed: list[dict[str, torch.Tensor]] = []

    def local(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.grad.to_local().clone() for n, p in module.named_parameters() if p.grad is not None}

    class Record(pl.Callback):
        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            micro.append(local(pl_module))  # this micro-batch's reduce-scattered shard, before the strategy takes it

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
            handed.append(local(pl_module))

    module = CompensatedBlocks()
    strategy = FSDP2Strategy(optimizer="lightning_precision.optim.CompensatedAdamW", accumulate_grad_dtype="float32")
    t = trainer(strategy, out, steps=1, accumulate_grad_batches=4, callbacks=[Record()])
    t.fit(module, loader())
    names = sorted(handed[0])
    fp32_sum = {n: sum(m[n].float() for m in micro) for n in names}
    return {
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "micro_batches": len(micro),
        "steps": len(handed),
        "handed_dtype": sorted({dtype_name(g.dtype) for g in handed[0].values()}),
        "micro_fresh": all(set(m) == set(names) for m in micro),
        "equals_fp32_sum": all(torch.equal(handed[0][n], fp32_sum[n].to(handed[0][n].dtype)) for n in names),
        "pending_after_step": t.strategy.grad_accumulator.pending,
    }


def scenario_accumulate_fp32_plugin(out: Path) -> dict[str, Any]:
    """The same with the buffers on the Trainer plugin (HalfPrecisionForAudio) instead of the strategy: the plugin sweeps
    the sharded gradients after each backward, before on_after_backward."""
    from lightning_precision import HalfPrecisionForAudio

    released: list[bool] = []
    summed: dict[int, torch.Tensor] = {}
    handed: dict[int, torch.Tensor] = {}

    class Record(pl.Callback):
        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            released.append(all(p.grad is None for p in pl_module.parameters()))
            buffers = trainer.precision_plugin.grad_accumulator.buffers
            summed.update({id(p): b.to_local().clone() for p, b in buffers.items()})

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
            handed.update({id(p): p.grad.to_local().clone() for p in pl_module.parameters()})

    module = CompensatedBlocks()
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="error")
    strategy = FSDP2Strategy(optimizer="lightning_precision.optim.CompensatedAdamW")
    t = trainer(strategy, out, steps=1, precision=None, plugins=[plugin], accumulate_grad_batches=4,
                callbacks=[Record()])  # fmt: skip
    t.fit(module, loader())
    return {
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "released": released,
        "summed_dtypes": sorted({dtype_name(b.dtype) for b in summed.values()}),
        "equals_fp32_sum": set(summed) == set(handed)
        and all(torch.equal(handed[k], summed[k].to(handed[k].dtype)) for k in summed),
        "pending_after_step": plugin.grad_accumulator.pending,
    }


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    result = globals()[f"scenario_{scenario}"](out)
    rank = int(os.environ.get("RANK", "0"))
    finish(out, scenario, rank, result)


if __name__ == "__main__":
    main()
