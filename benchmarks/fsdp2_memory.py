"""Per-rank resident parameter + optimizer-state bytes under FSDP2Strategy, 1 rank against 2 ranks.

Measured from the tensors themselves (local shards of the DTensor parameters and of AdamW's exp_avg/exp_avg_sq/step),
not from the allocator. Run from the repository root::

    python benchmarks/fsdp2_memory.py

It launches itself under ``torch.distributed.run`` with 1 and then 2 processes (gloo, CPU) and prints a table.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import harness

from lightning_precision import FSDP2Strategy

DIM, BLOCKS = 256, 4
WORKER = "measure"


def _measure(out: Path) -> None:
    warnings.filterwarnings("ignore")
    loader = harness.regression_loader(16, DIM, batch_size=4)
    model = harness.MLP(DIM, BLOCKS, lr=1e-3)
    trainer = harness.trainer(
        devices=int(os.environ["LOCAL_WORLD_SIZE"]), strategy=FSDP2Strategy(), precision="bf16-mixed", max_steps=1
    )
    trainer.fit(model, loader)
    param_bytes, state_bytes = harness.resident_bytes(trainer.optimizers[0])
    storage = str(next(model.parameters()).dtype)
    harness.write_rank_result(out, {"param_bytes": param_bytes, "state_bytes": state_bytes, "storage": storage})


def _run(nproc: int) -> list[dict]:
    return harness.run_on_ranks(Path(__file__), WORKER, nproc).results


def main() -> None:
    one, two = _run(1), _run(2)
    base = one[0]["param_bytes"] + one[0]["state_bytes"]
    print(f"Model: {BLOCKS} blocks of Linear({DIM}, {DIM}) + head; torch AdamW; FSDP2Strategy, precision=bf16-mixed")
    print(
        f"{'ranks':>5} {'rank':>4} {'storage':>14} {'param bytes':>12} {'state bytes':>12} {'total':>12} {'vs 1 rank':>9}"
    )
    worst = 0.0
    for n, results in ((1, one), (2, two)):
        for r, res in enumerate(results):
            total = res["param_bytes"] + res["state_bytes"]
            ratio = total / base
            worst = max(worst, ratio) if n == 2 else worst
            print(
                f"{n:>5} {r:>4} {res['storage']:>14} {res['param_bytes']:>12,} {res['state_bytes']:>12,} "
                f"{total:>12,} {ratio:>9.3f}"
            )
    print(f"worst 2-rank ratio: {worst:.3f} (target <= 0.55): {'OK' if worst <= 0.55 else 'OVER'}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        _measure(Path(sys.argv[2]))
    else:
        main()
