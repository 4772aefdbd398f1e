"""CompensatedAdamW on DTensor parameters, run under ``torch.distributed.run`` (gloo, one process per rank).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 _compensated_adamw_worker.py SCENARIO OUT_DIR``.
Each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with what it observed; the tests in
``test_compensated_adamw_distributed.py`` assert on those files. Not a test module itself.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from lightning_precision.optim import CompensatedAdamW
from tests._worker_exit import finish

STEPS = 4
# (shape, dtype, placement): uneven shards (7 rows on 2 ranks), an fp32 parameter, a replicated one.
SPECS = [
    ((7, 5), torch.bfloat16, Shard(0)),
    ((10, 3), torch.float16, Shard(1)),
    ((4099,), torch.bfloat16, Shard(0)),
    ((6, 4), torch.float32, Shard(0)),
    ((3,), torch.bfloat16, Replicate()),
]
OPTIONS = {"lr": 1e-2, "weight_decay": 0.1, "chunk_size": 100}
# Both moments in bf16, rounded stochastically: the noise must follow the global element, not the shard.
STOCHASTIC = {**OPTIONS, "exp_avg_sq_dtype": torch.bfloat16, "exp_avg_rounding": "stochastic",
              "exp_avg_sq_rounding": "stochastic", "rounding_seed": 7}  # fmt: skip


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape, dtype, _ in SPECS]


def _train_plain(options: dict[str, Any]) -> tuple[list[torch.Tensor], CompensatedAdamW]:
    """The single-process result every rank compares against."""
    params = [torch.nn.Parameter(t) for t in _tensors(0)]
    opt = CompensatedAdamW(params, **options)
    for step in range(STEPS):
        for p, g in zip(params, _tensors(step + 1)):
            p.grad = g
        opt.step()
    return params, opt


def _train_dtensor(
    mesh, implementation: str, options: dict[str, Any]
) -> tuple[list[torch.Tensor], CompensatedAdamW, int]:
    params = [
        torch.nn.Parameter(distribute_tensor(t, mesh, [placement])) for t, (_, _, placement) in zip(_tensors(0), SPECS)
    ]
    opt = CompensatedAdamW(params, implementation=implementation, **options)
    collectives = 0
    for step in range(STEPS):
        for p, g, (_, _, placement) in zip(params, _tensors(step + 1), SPECS):
            p.grad = distribute_tensor(g, mesh, [placement])
        with CommDebugMode() as comm:
            opt.step()
        collectives += comm.get_total_counts()
    return params, opt, collectives


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def dtensor(out: Path, rank: int, options: dict[str, Any] = OPTIONS) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plain, plain_opt = _train_plain(options)
    result: dict[str, Any] = {}
    for implementation in ("chunked", "reference", "compiled"):
        params, opt, collectives = _train_dtensor(mesh, implementation, options)
        mismatches = []
        for i, (p, q) in enumerate(zip(params, plain)):
            if not torch.equal(_full(p.detach()), q.detach()):
                mismatches.append(f"param {i}")
            for key, value in plain_opt.state[q].items():
                mine = opt.state[p][key]
                if key != "step" and not isinstance(mine, DTensor):
                    mismatches.append(f"param {i} {key} is not a DTensor")
                if not torch.equal(_full(mine), value):
                    mismatches.append(f"param {i} {key}")
        result[implementation] = {
            "mismatches": mismatches,
            "collectives_in_step": collectives,
            "local_numels": [p.to_local().numel() for p in params],
        }
    return result


def fsdp2(out: Path, rank: int) -> dict[str, Any]:
    """bf16 blocks sharded by fully_shard: chunked and reference steps agree; the optimizer state saves with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    models, opts = [], []
    for implementation in ("chunked", "reference"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 4))
        model.to(torch.bfloat16)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        models.append(model)
        opts.append(CompensatedAdamW(model.parameters(), lr=1e-2, implementation=implementation, chunk_size=50))
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(8, 16, generator=g).to(torch.bfloat16)
        for model, opt in zip(models, opts):
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    params = [list(m.parameters()) for m in models]
    equal = all(
        torch.equal(p.to_local(), q.to_local()) and torch.equal(o0.to_local(), o1.to_local())
        for p, q in zip(*params)
        for o0, o1 in zip(
            (opts[0].state[p][k] for k in ("exp_avg", "exp_avg_sq", "compensation")),
            (opts[1].state[q][k] for k in ("exp_avg", "exp_avg_sq", "compensation")),
        )
    )
    saved = None
    try:
        # full_state_dict + cpu_offload type-checks every value (torch.dtype in param_groups failed here); rank 0
        # alone receives the full dict.
        full = get_optimizer_state_dict(
            models[0], opts[0], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        checkpoint = str(out / "dcp")
        dcp.save({"optim": get_optimizer_state_dict(models[0], opts[0])}, checkpoint_id=checkpoint)
        restored = CompensatedAdamW(models[0].parameters(), lr=5.0)
        target = {"optim": get_optimizer_state_dict(models[0], restored)}
        dcp.load(target, checkpoint_id=checkpoint)
        set_optimizer_state_dict(models[0], restored, target["optim"])
        exact = (
            all(
                torch.equal(restored.state[p][k].to_local(), opts[0].state[p][k].to_local())
                for p in params[0]
                for k in ("exp_avg", "exp_avg_sq", "compensation")
            )
            and restored.param_groups[0]["lr"] == opts[0].param_groups[0]["lr"]
        )
        names_ok = full == {} if rank else full["param_groups"][0]["exp_avg_dtype"] == "bfloat16"
        saved = "ok" if exact and names_ok else f"exact={exact} names_ok={names_ok}"
    except Exception as exc:  # reported to the test, which names the failure
        saved = f"{type(exc).__name__}: {exc}"
    return {"chunked_equals_reference": equal, "dcp": saved, "sharded": all(isinstance(p, DTensor) for p in params[0])}


SCENARIOS = {"dtensor": dtensor, "dtensor_stochastic": partial(dtensor, options=STOCHASTIC), "fsdp2": fsdp2}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    finish(out, scenario, rank, SCENARIOS[scenario](out, rank))


if __name__ == "__main__":
    main()
