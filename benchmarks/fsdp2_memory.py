"""Per-rank resident parameter + optimizer-state bytes under FSDP2Strategy, 1 rank against 2 ranks.

Measured from the tensors themselves (local shards of the DTensor parameters and of AdamW's exp_avg/exp_avg_sq/step),
not from the allocator. Run from the repository root::

    python benchmarks/fsdp2_memory.py

It launches itself under ``torch.distributed.run`` with 1 and then 2 processes (gloo, CPU) and prints a table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIM, BLOCKS = 256, 4


def _measure(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl
    from torch import nn
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_precision import FSDP2Strategy

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.GELU()) for _ in range(BLOCKS))
            self.head = nn.Linear(DIM, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for block in self.blocks:
                x = block(x)
            return nn.functional.mse_loss(self.head(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    warnings.filterwarnings("ignore")
    data = TensorDataset(torch.randn(16, DIM), torch.randn(16, 1))
    model = Model()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=FSDP2Strategy(),
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    optimizer = trainer.optimizers[0]
    params = list(model.parameters())
    param_bytes = sum(local(p).numel() * local(p).element_size() for p in params)
    state_bytes = sum(
        local(v).numel() * local(v).element_size()
        for p in params
        for v in optimizer.state[p].values()
        if isinstance(v, torch.Tensor)
    )
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(
        json.dumps({"param_bytes": param_bytes, "state_bytes": state_bytes, "storage": str(params[0].dtype)})
    )


def _run(nproc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
        proc = subprocess.run(
            [*cmd, __file__, "--measure", tmp], check=False, capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise SystemExit(f"{nproc}-rank run failed:\n{proc.stderr[-4000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


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
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        _measure(Path(sys.argv[2]))
    else:
        main()
