"""Hugging Face ``LlamaForCausalLM`` (tiny config, tied embeddings) under FSDP2Strategy, run under torch.distributed.run.

Usage: ``python -m torch.distributed.run --nproc_per_node=N _hf_worker.py SCENARIO OUT_DIR``; each rank writes
``OUT_DIR/<scenario>.rank<r>.json``. ``fit`` trains on 2 ranks and saves a sharded checkpoint with the full parameters
beside it; ``resume`` loads that checkpoint on another world size and records what it restored.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worktree's package, not an installed one

from lightning_precision import FSDP2Strategy
from lightning_precision.dtypes import dtype_name
from tests._worker_exit import finish


class TinyLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
        self.model = LlamaForCausalLM(config)
        self.loss_dtypes: list[str] = []
        self.losses: list[float] = []
        self.at_start: dict[str, list[float]] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        self.loss_dtypes.append(dtype_name(out.loss.dtype))
        self.losses.append(float(out.loss.detach()))
        return out.loss

    def on_train_start(self) -> None:
        self.at_start = full_params(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def full_params(module: torch.nn.Module) -> dict[str, list[float]]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().flatten().tolist()
        for name, p in module.named_parameters()
    }


def loader() -> DataLoader:
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=FSDP2Strategy(on_unsafe="error"),
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )


def scenario_fit(out: Path) -> dict[str, Any]:
    module = TinyLlama()
    t = trainer(out, steps=2)
    t.fit(module, loader())
    t.save_checkpoint(out / "llama.ckpt")
    saved = full_params(module)
    if t.is_global_zero:
        (out / "saved_params.json").write_text(json.dumps(saved))
    llama = module.model
    return {
        "tied": llama.lm_head.weight is llama.model.embed_tokens.weight,
        "is_dtensor": all(isinstance(p, DTensor) for p in module.parameters()),
        "storage": sorted({dtype_name(p.dtype) for p in module.parameters()}),
        "compute": dtype_name(t.strategy.compute_dtype),
        "loss_dtypes": sorted(set(module.loss_dtypes)),
        "losses_finite": all(torch.isfinite(torch.tensor(module.losses)).tolist()),
        "checkpoint_is_dir": (out / "llama.ckpt").is_dir(),
    }


def scenario_resume(out: Path) -> dict[str, Any]:
    module = TinyLlama()
    t = trainer(out, steps=3)
    t.fit(module, loader(), ckpt_path=str(out / "llama.ckpt"))
    saved = json.loads((out / "saved_params.json").read_text())
    return {
        "world_size": t.world_size,
        "global_step": t.global_step,
        "restored_exactly": saved == module.at_start,
        "tied": module.model.lm_head.weight is module.model.model.embed_tokens.weight,
        "loss_dtypes": sorted(set(module.loss_dtypes)),
    }


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    result = globals()[f"scenario_{scenario}"](out)
    finish(out, scenario, int(os.environ.get("RANK", "0")), result)


if __name__ == "__main__":
    main()
