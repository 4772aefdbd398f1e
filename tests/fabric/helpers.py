"""A tiny Fabric loop that records what the precision did to dtypes, for the Fabric tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from tests.helpers import loader


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


class Net(nn.Module):
    """Two linear layers; records the dtypes its forward sees (a dict batch, as the Trainer tests use)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1))
        self.seen: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen.append(
            {
                "x": batch["x"].dtype,
                "audio": batch["audio_signal"].dtype,
                "idx": batch["idx"].dtype,
                "param": self.net[0].weight.dtype,
                "default": torch.get_default_dtype(),
                "autocast": torch.is_autocast_enabled("cpu"),
            }
        )
        out = self.net(batch["x"] + batch["audio_signal"].to(batch["x"].dtype))
        return nn.functional.mse_loss(out.float(), batch["y"].float())


def fabric_with(*plugins: Any, **kwargs: Any) -> Fabric:
    return Fabric(accelerator="cpu", devices=1, plugins=list(plugins) or None, **kwargs)


def train(
    fabric: Fabric,
    model: nn.Module,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] = adamw,
    steps: int = 3,
    before_loop: Callable[[Fabric, Any], Any] | None = None,
) -> tuple[Any, Any]:
    """The plain Fabric loop of the docs: setup, forward, ``fabric.backward``, step. Returns (model, optimizer)."""
    optimizer = optimizer_factory(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    if before_loop is not None:
        before_loop(fabric, optimizer)
    for step, batch in enumerate(fabric.setup_dataloaders(loader())):
        if step == steps:
            break
        loss = model(batch)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def state_dtypes(optimizer: Any, param: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    state = optimizer.state[param]
    return state["exp_avg"].dtype, state["exp_avg_sq"].dtype
