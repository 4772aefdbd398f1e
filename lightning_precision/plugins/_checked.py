"""The Trainer side of this library's plugins: the pairing check when Lightning connects the plugin, and input casting
of the batch. What the Fabric plugins share with them lives in :mod:`lightning_precision._plugin_common`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.precision import Precision
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision._plugin_common import HalfInputsMixin, PairingCheckMixin
from lightning_precision.policy import trainer_components


class _PairingCheck(PairingCheckMixin, Precision):
    """Base for this library's Trainer plugins: checks the optimizer pairing when Lightning connects the plugin.

    Listed first in a plugin's bases so its hooks take precedence over Lightning's.
    """

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        # Lightning connects the plugin after the optimizers exist and before the first step: the earliest point at
        # which the real pairing can be judged, on every rank alike. Under a Trainer, a policy set on the guard or
        # the strategy applies here too.
        self.adopt_on_unsafe(trainer_components(getattr(model, "_trainer", None)))
        self.judge_optimizers(optimizers)
        return model, optimizers, lr_schedulers


class _CheckedHalfInputs(HalfInputsMixin, _PairingCheck):
    """Base for the half Trainer plugins: Lightning hands ``convert_input`` the batch of ``training_step``."""

    @override
    def convert_input(self, data: Any) -> Any:
        return self.cast_inputs(data)
