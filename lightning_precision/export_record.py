"""What the plugins and the strategy record in every checkpoint so that ``export`` can read it without the model.

A single-file Lightning checkpoint keys optimizer state by index (position in the optimizer's param groups), not by
name, so the exporter could only guess which ``compensation`` buffer belongs to which weight. Recording the names, and
the precision contract even when no :class:`~lightning_precision.PrecisionGuard` is attached, removes the guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_precision.modes import known_mode
from lightning_precision.pairing import check_optimizer
from lightning_precision.report import CHECKPOINT_KEY, trainer_contract

PARAM_NAMES_KEY = "optimizer_param_names"  # one list per optimizer, in the order of its param groups' params


def optimizer_param_names(
    module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> list[list[str | None]]:
    """The names (as in ``module.state_dict()``) of each optimizer's parameters, in param-group order.

    Args:
        module: The module whose state dict the checkpoint holds (the LightningModule).
        optimizers: The optimizers, in checkpoint order (``checkpoint["optimizer_states"]``).

    Returns:
        One list per optimizer; ``None`` for a parameter the module does not own. A tied parameter gets its first
        name, the one ``named_parameters`` reports.
    """
    names: dict[int, str] = {}
    for name, param in module.named_parameters():
        names.setdefault(id(param), name)
    return [[names.get(id(p)) for group in opt.param_groups for p in group["params"]] for opt in optimizers]


def record_for_export(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Add the optimizer parameter names, and the precision contract unless one is there, to ``checkpoint``.

    Args:
        checkpoint: The checkpoint dict being saved.
        trainer: The Trainer saving it; nothing is recorded without one (a plugin used outside a Trainer).
    """
    module = getattr(trainer, "lightning_module", None)
    if module is None:
        return
    optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]  # unwrap LightningOptimizer
    checkpoint[PARAM_NAMES_KEY] = optimizer_param_names(module, optimizers)
    if CHECKPOINT_KEY in checkpoint:  # the guard's contract is the richer one (measured underflow, observed state)
        return
    mode = known_mode(trainer.precision)
    verdicts = [check_optimizer(o, precision=mode) for o in optimizers]  # judged, not enforced: saving must not raise
    contract = trainer_contract(trainer, optimizers, verdicts, observe_state=True)
    checkpoint[CHECKPOINT_KEY] = contract.to_dict()
