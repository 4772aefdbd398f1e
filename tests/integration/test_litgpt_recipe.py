"""The LitGPT recipe of docs/recipes.md, run as written on its LitGPT-shaped model, and with the trap swapped in."""

import re
from pathlib import Path

import pytest
import torch

from lightning_precision import PrecisionPairingError, Status

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
SECTION = "## LitGPT fine-tune with the Fabric plugin"


def _recipe() -> str:
    text = RECIPES.read_text()
    section = text[text.index(SECTION) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "litgpt_recipe"}
    exec(compile(code, str(RECIPES), "exec"), namespace)  # noqa: S102 - the repository's own docs
    return namespace


def test_litgpt_recipe_trains_bf16_weights_safely():
    ns = _run(_recipe())
    model, optimizer = ns["model"], ns["optimizer"]
    assert ns["verdict"].status is Status.SAFE
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model.cos).all() and torch.isfinite(model.sin).all()  # root rotary buffers, used each step
    assert all(torch.isfinite(torch.tensor(ns["losses"])))
    assert ns["losses"][-1] < ns["losses"][0]
    assert len(optimizer.state) == len(list(model.parameters()))  # every parameter stepped


def test_litgpt_recipe_with_torch_adamw_is_refused_before_any_step():
    code = _recipe()
    assert code.count("CompensatedAdamW(") == 1
    with pytest.raises(PrecisionPairingError, match="AdamW"):
        _run(code.replace("CompensatedAdamW(", "torch.optim.AdamW("))
