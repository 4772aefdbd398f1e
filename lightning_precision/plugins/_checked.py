"""Behaviour shared by this library's plugins: a pairing check when connected, and audio-preserving input casting."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision.casting import cast_batch, normalize_preserve_keys
from lightning_precision.dtypes import parse_bool
from lightning_precision.modes import known_mode
from lightning_precision.policy import OnUnsafe, PolicyHolder, check_and_enforce, trainer_components


class _PairingCheck(PolicyHolder, Precision):
    """Base for this library's plugins: checks the optimizer pairing when Lightning connects the plugin.

    Listed first in a plugin's bases so its hooks take precedence over Lightning's.
    """

    def _init_pairing_check(self, on_unsafe: OnUnsafe | None, peft: bool) -> None:
        self._init_policy(on_unsafe)
        self.peft = parse_bool(peft, what=f"{type(self).__name__}(peft=...)")

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        # Lightning connects the plugin after the optimizers exist and before the first step: the earliest point at
        # which the real pairing can be judged, on every rank alike. Under a Trainer, a policy set on the guard or
        # the strategy applies here too.
        self.adopt_on_unsafe(trainer_components(getattr(model, "_trainer", None)))
        check_and_enforce(
            optimizers,
            on_unsafe=self.on_unsafe,
            peft=self.peft,
            where=type(self).__name__,
            precision=known_mode(getattr(self, "precision", None)),
        )
        return model, optimizers, lr_schedulers


class _CheckedHalfInputs(_PairingCheck):
    """Base for the half plugins: also casts batches with :func:`cast_batch`, keeping preserved keys."""

    _desired_input_dtype: torch.dtype

    def _init_checks(self, preserve_keys: str | Iterable[str] | None, on_unsafe: OnUnsafe | None, peft: bool) -> None:
        self.preserve_keys = normalize_preserve_keys(preserve_keys)
        self._init_pairing_check(on_unsafe, peft)

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_batch(data, self._desired_input_dtype, self.preserve_keys)
