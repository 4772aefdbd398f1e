"""Distributed scenarios for ``fsdp2_parallelize`` under Fabric's ``ModelParallelStrategy``, run under
``torch.distributed.run`` (one process per rank, gloo on CPU).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 --standalone _fsdp2_worker.py SCENARIO OUT_DIR``.
Each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with what it observed; the pytest tests assert on those files.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from lightning_precision import PrecisionPairingError, PrecisionWarning
from lightning_precision.dtypes import dtype_name
from lightning_precision.fabric import HalfPrecisionForAudio, check, fsdp2_parallelize
from lightning_precision.optim import CompensatedAdamW
from tests._worker_exit import finish

DIM, BLOCKS, STEPS = 16, 3, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, 1)
        self.inside: dict[str, str] = {}
        self.blocks[0].fc.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.inside = {"input": dtype_name(inputs[0].dtype), "output": dtype_name(output.dtype)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"] + batch["audio_signal"].to(batch["x"].dtype)
        for block in self.blocks:
            x = block(x)
        return nn.functional.mse_loss(self.head(x).float(), batch["y"].float())


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        {
            "x": torch.randn(2, DIM, generator=g),
            "audio_signal": torch.randn(2, DIM, generator=g),
            "y": torch.randn(2, 1),
        }
        for _ in range(STEPS)
    ]


def make_fabric(parallelize_fn: Any, **kwargs: Any) -> Fabric:
    strategy = ModelParallelStrategy(parallelize_fn, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, **kwargs)
    fabric.launch()
    return fabric


def storage(module: nn.Module) -> list[str]:
    return sorted({dtype_name(p.dtype) for p in module.parameters()})


def step(fabric: Fabric, model: Any, optimizer: Any, batch: dict[str, torch.Tensor]) -> float:
    loss = model(batch)
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return float(fabric.all_reduce(loss.detach(), reduce_op="mean"))


def scenario_fit(out: Path) -> dict[str, Any]:
    """bf16-mixed with torch AdamW: fp32 shards, bf16 blocks, fp32 reduction; save and load a sharded checkpoint."""
    parallelize_fn = fsdp2_parallelize("bf16-mixed", optimizer=torch.optim.AdamW)
    fabric = make_fabric(parallelize_fn)
    net = Model()
    model = fabric.setup_module(net)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    records = _capture_logs()
    verdicts = check(fabric, optimizer, on_unsafe="error")
    losses = [step(fabric, model, optimizer, b) for b in batches(fabric.global_rank)]
    weight = net.blocks[0].fc.weight
    state = optimizer.state[weight]
    path = out / "checkpoint"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": STEPS})

    fresh_net = Model()  # same init as the trained model's start, so a load that did nothing shows
    fresh = fabric.setup_module(fresh_net)
    fresh_optimizer = fabric.setup_optimizers(torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    pairs = list(zip(net.parameters(), fresh_net.parameters()))
    differs_before_load = not all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs)
    remainder = fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer})
    return {
        "is_dtensor": isinstance(weight, DTensor),
        "placements": [str(p) for p in weight.placements],
        "mesh_size": weight.device_mesh.size(),
        "local_rows": weight.to_local().shape[0],
        "global_rows": weight.shape[0],
        "storage": storage(net),
        "state": [dtype_name(state["exp_avg"].dtype), dtype_name(state["exp_avg_sq"].dtype)],
        "inside": net.inside,
        "plan": parallelize_fn.plan.to_dict(),
        "verdicts": [v.status.value for v in verdicts],
        "contract_logged": any("Precision contract (precision=bf16-mixed)" in r for r in records),
        "contract_has_reduce": any("float32" in r and "bfloat16" in r for r in records),
        "losses": losses,
        "checkpoint_is_dir": path.is_dir(),
        "loaded_step": remainder.get("step"),
        "differs_before_load": differs_before_load,
        "reloaded_equal": all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs),
        "reloaded_storage": storage(fresh_net),
        "reloaded_state_equal": torch.equal(
            fresh_optimizer.state[fresh_net.blocks[0].fc.weight]["exp_avg_sq"].to_local(),
            state["exp_avg_sq"].to_local(),
        ),
    }


def scenario_true_fp32_head(out: Path) -> dict[str, Any]:
    """bf16-true through the plugin, the head kept fp32 by the plugin's fp32_modules, CompensatedAdamW: safe."""
    plugin = HalfPrecisionForAudio("bf16-true", fp32_modules=["head"], on_unsafe="error")
    parallelize_fn = fsdp2_parallelize("bf16-true", optimizer=CompensatedAdamW)
    fabric = make_fabric(parallelize_fn, plugins=[plugin])
    net = Model()
    model = fabric.setup_module(net)
    optimizer = fabric.setup_optimizers(CompensatedAdamW(model.parameters(), lr=1e-2))
    losses = [step(fabric, model, optimizer, b) for b in batches(fabric.global_rank)]
    return {
        "head_storage": storage(net.head),
        "block_storage": storage(net.blocks),
        "head_is_dtensor": isinstance(net.head.weight, DTensor),
        "fp32_module_names": list(parallelize_fn.fp32_module_names),
        "losses_finite": all(torch.isfinite(torch.tensor(losses))),
    }


def scenario_accumulate_fp32(out: Path) -> dict[str, Any]:
    """bf16-true through the plugin with accumulate_grad_dtype="float32": the plugin converted the module before Fabric
    sharded it, so it must find the new DTensor parameters and sum their reduce-scattered shards in fp32."""
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="error")
    fabric = make_fabric(fsdp2_parallelize("bf16-true", optimizer=CompensatedAdamW), plugins=[plugin])
    net = Model()
    model = fabric.setup_module(net)
    optimizer = fabric.setup_optimizers(CompensatedAdamW(model.parameters(), lr=1e-2))
    released = []
    for batch in batches(fabric.global_rank):
        fabric.backward(model(batch) / STEPS)
        released.append(all(p.grad is None for p in net.parameters()))
    buffers = dict(plugin.grad_accumulator.buffers)
    expected = {id(p): b.clone() for p, b in buffers.items()}
    fabric.clip_gradients(model, optimizer, max_norm=1e9)
    handed = all(torch.equal(p.grad.to_local(), expected[id(p)].to_local().bfloat16()) for p in buffers)
    optimizer.step()
    return {
        "released_each_micro_batch": all(released),
        "buffers_are_fp32_shards": sorted({f"{type(b).__name__} {dtype_name(b.dtype)}" for b in buffers.values()}),
        "buffered": len(buffers),
        "params": len(list(net.parameters())),
        "handed_equals_sum": handed,
        "pending_after_step": plugin.grad_accumulator.pending,
    }


def scenario_unsafe_error(out: Path) -> dict[str, Any]:
    """bf16-true with torch AdamW under on_unsafe="error", no check() call and no optimizer named to
    fsdp2_parallelize (which would refuse it at sharding): refused at the first step, every rank."""
    plugin = HalfPrecisionForAudio("bf16-true", on_unsafe="error")
    fabric = make_fabric(fsdp2_parallelize("bf16-true"), plugins=[plugin])
    net = Model()
    model = fabric.setup_module(net)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = [p.to_local().clone() for p in net.parameters()]
    try:
        step(fabric, model, optimizer, batches(fabric.global_rank)[0])
    except PrecisionPairingError as err:
        raised, message = type(err).__name__, str(err)
    else:
        raised, message = None, ""
    return {
        "raised": raised,
        "message": message,
        "unchanged": all(torch.equal(a, p.to_local()) for a, p in zip(before, net.parameters())),
        "state_empty": len(optimizer.state) == 0,
    }


_LOGS: list[str] = []


def _capture_logs() -> list[str]:
    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _LOGS.append(record.getMessage())

    logging.getLogger("lightning_precision").addHandler(Keep())
    return _LOGS


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionWarning)
        result = globals()[f"scenario_{scenario}"](out)
    rank = torch.distributed.get_rank()
    result["precision_warnings"] = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    finish(out, scenario, rank, result)


if __name__ == "__main__":
    main()
