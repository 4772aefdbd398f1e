"""A tiny LightningModule that records what the precision did to dtypes, for the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DictDataset(Dataset):
    """Dict batches with a plain float input, an audio float input and an integer tensor."""

    def __init__(self, n: int = 16, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.audio = torch.randn(n, dim, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "audio_signal": self.audio[i], "y": self.y[i], "idx": torch.tensor(i)}


def loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    return DataLoader(DictDataset(n), batch_size=batch_size, shuffle=False)


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class RecordingModule(pl.LightningModule):
    """Two linear layers; records dtypes seen inside ``training_step`` and the optimizer state after each step."""

    def __init__(self, optimizer_factory: Callable[[Any], torch.optim.Optimizer] = adamw, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer_factory = optimizer_factory
        self.seen: list[dict[str, Any]] = []
        self.state_dtypes: dict[str, torch.dtype] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weight = self.net[0].weight
        self.seen.append(
            {
                "x": batch["x"].dtype,
                "audio": batch["audio_signal"].dtype,
                "idx": batch["idx"].dtype,
                "param": weight.dtype,
                "default": torch.get_default_dtype(),
                "autocast": torch.is_autocast_enabled("cpu"),
            }
        )
        inputs = batch["x"] + batch["audio_signal"].to(batch["x"].dtype)
        out = self.net(inputs)
        return nn.functional.mse_loss(out.float(), batch["y"].float())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        state = self.trainer.optimizers[0].state.get(self.net[0].weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                value = state[key]
                self.state_dtypes[key] = getattr(value, "data", value).dtype

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


# A short, quiet CPU run: what every fit in the tests shares.
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def fit(module: pl.LightningModule, steps: int = 3, **trainer_kwargs: Any) -> pl.Trainer:
    """Fit ``module`` for a few steps on CPU, quietly."""
    trainer = pl.Trainer(**{**QUIET_TRAINER, "max_steps": steps, **trainer_kwargs})
    trainer.fit(module, loader())
    return trainer


def lora_llama() -> nn.Module:
    """A tiny PEFT LoRA Llama (no weights downloaded); skips without the test extras."""
    import pytest

    peft = pytest.importorskip("peft", reason="peft is a test extra: pip install -e '.[test]'")
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; nonzero so that A's gradient is too and both train visibly
            torch.nn.init.normal_(param, std=0.02)
    return model


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adamw_state(model: torch.nn.Module) -> dict:
    """A clean torch AdamW state for ``model``'s parameters, keyed by name (as a resume reads it)."""
    return {
        name: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.ones_like(p)}
        for name, p in model.named_parameters()
    }


def _lightning_below_2_5() -> bool:
    from packaging.version import Version

    from lightning_precision.upstream import installed_version

    return installed_version("lightning") < Version("2.5")


# Lightning 2.4 replays the last batch of an epoch when it resumes a checkpoint saved on that batch (the resumed run
# trains epoch 0 batch 3 again, in 32-true too); 2.5.0 resumes at the next epoch. A bitwise resume test needs >= 2.5.
needs_lightning_2_5_resume = pytest.mark.skipif(
    _lightning_below_2_5(),
    reason="Lightning 2.4 replays the last batch of an epoch on resume from a checkpoint saved on it; 2.5 does not",
)
