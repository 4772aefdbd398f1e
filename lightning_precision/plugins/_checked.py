"""Behaviour shared by this library's plugins: a pairing check when connected, and audio-preserving input casting."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision.casting import PreserveKey, cast_batch, normalize_preserve_keys
from lightning_precision.dtypes import parse_bool
from lightning_precision.fp32_modules import (
    Fp32ModuleSelector,
    add_fp32_boundaries,
    cast_keeping_fp32,
    normalize_fp32_modules,
    select_fp32_modules,
)
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
    """Base for the half plugins: also casts batches with :func:`cast_batch`, keeping preserved keys, and keeps the
    chosen submodules in fp32 (:mod:`lightning_precision.fp32_modules`)."""

    _desired_input_dtype: torch.dtype

    def _init_checks(
        self,
        preserve_keys: PreserveKey | Iterable[PreserveKey] | None,
        on_unsafe: OnUnsafe | None,
        peft: bool,
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
    ) -> None:
        self.preserve_keys = normalize_preserve_keys(preserve_keys)
        self.fp32_modules = normalize_fp32_modules(fp32_modules, what=f"{type(self).__name__}(fp32_modules=...)")
        self.fp32_module_names: tuple[str, ...] = ()  # what convert_module kept in fp32, for the contract
        self._init_pairing_check(on_unsafe, peft)

    def _convert_keeping_fp32(self, module: Module, cast: Callable[[Module], Any]) -> Module:
        kept = select_fp32_modules(module, self.fp32_modules)
        cast_keeping_fp32(module, kept, cast)
        add_fp32_boundaries(kept, self._desired_input_dtype)
        self.fp32_module_names = tuple(name for name, _ in kept)
        return module

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_batch(data, self._desired_input_dtype, self.preserve_keys)
