"""The Fabric side of this library's plugins: the pairing check at the first optimizer step, and input casting of the
forward call. What they share with the Trainer plugins lives in :mod:`lightning_precision._plugin_common`."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from lightning.fabric.plugins.precision import Precision
from lightning.fabric.utilities.types import Optimizable
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision._plugin_common import HalfInputsMixin, PairingCheckMixin
from lightning_precision.fabric.fsdp2 import FSDP2Parallelize, mark_converted, sharding_of
from lightning_precision.grad_accumulation import accumulate_grad_dtype_of
from lightning_precision.modes import known_mode
from lightning_precision.pairing import Verdict
from lightning_precision.policy import OnUnsafe
from lightning_precision.report import PrecisionContract, build_contract, log_contract


class _FabricPairingCheck(PairingCheckMixin, Precision):
    """Base for this library's Fabric plugins: judges each optimizer before its first step.

    Fabric hands no plugin hook the optimizers before they step (``convert_module`` sees only the model, and
    ``setup_optimizers`` goes to the strategy), so :func:`lightning_precision.fabric.check` judges them right after
    ``fabric.setup``; an optimizer it has not judged is judged here, before its first update is applied, so a run that
    forgets the call is still warned or refused with its parameters untouched.
    """

    pairing_api = "fabric"
    _converted: weakref.ref[Module] | None = None  # the module of the latest fabric.setup, to find its sharding

    @override
    def _init_pairing_check(self, on_unsafe: OnUnsafe | None, peft: bool) -> None:
        super()._init_pairing_check(on_unsafe, peft)
        self._judged: weakref.WeakSet[Optimizer] = weakref.WeakSet()

    @override
    def convert_module(self, module: Module) -> Module:
        self._remember(module)
        return super().convert_module(module)

    def _remember(self, module: Module) -> None:
        """Link the plugin and the module it converted, both ways and weakly: the first-step check finds the
        module's sharding, and fsdp2_parallelize the plugin's policy."""
        self._converted = weakref.ref(module)
        mark_converted(module, self)

    def mark_judged(self, optimizers: Iterable[Optimizer]) -> None:
        """Record optimizers already judged (by :func:`~lightning_precision.fabric.check`): not judged again."""
        self._judged.update(optimizers)

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        # DeepSpeed hands its engine here, which has no param_groups to judge; its optimizer is judged by check().
        if isinstance(optimizer, Optimizer) and optimizer not in self._judged:
            self.judge_first_step(optimizer)
        return super().optimizer_step(optimizer, **kwargs)

    def judge_first_step(self, optimizer: Optimizer) -> list[Verdict]:
        """Judge ``optimizer`` under this plugin's policy and log its contract line on rank zero.

        Raises:
            PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"`` (before the step is applied).
        """
        where = f"{type(self).__name__}, first optimizer step"
        self._judged.add(optimizer)  # judged once, whether it passes or raises
        sharding = sharding_of(self._converted() if self._converted is not None else None)
        if sharding is not None and self._on_unsafe_adopted is None:
            self.adopt_on_unsafe([sharding])  # fsdp2_parallelize(on_unsafe=...), unless check() set one
        plan = sharding.plan if sharding is not None else None
        verdicts = self.judge_optimizers(
            [optimizer],
            where=where,
            storage_was_auto=plan.storage_was_auto if plan is not None else False,
            precision=plan.mode if plan is not None else None,
        )
        contract = fabric_contract(self, sharding, [optimizer], verdicts)
        log_contract(contract, verdicts, on_unsafe=self.on_unsafe, where=where)
        return verdicts


def fabric_contract(
    plugin: Any, sharding: FSDP2Parallelize | None, optimizers: list[Optimizer], verdicts: list[Verdict]
) -> PrecisionContract:
    """The contract of a Fabric run: the precision plugin's dtypes, or under :func:`fsdp2_parallelize` the plan's
    (its precision, compute and reduce dtypes), with the modules both keep in fp32."""
    plan = sharding.plan if sharding is not None else None
    mode = plan.mode if plan is not None else known_mode(getattr(plugin, "precision", None))
    return build_contract(
        mode.name if mode is not None else str(getattr(plugin, "precision", "-")),
        optimizers,
        verdicts,
        compute_dtype=plan.compute_dtype if plan is not None else (mode.compute_dtype if mode else None),
        reduce_dtype=plan.reduce_dtype if plan is not None else None,
        fp32_modules=[*getattr(plugin, "fp32_module_names", ()), *(sharding.fp32_module_names if sharding else ())],
        accumulate_grad_batches=None,  # the loop decides when to step
        accumulate_grad_dtype=accumulate_grad_dtype_of(plugin),
        model_cast=getattr(plugin, "model_cast", ""),
        parameters=getattr(plugin, "parameter_dtypes", ("-", "-")),
    )


class _FabricHalfInputs(HalfInputsMixin, _FabricPairingCheck):
    """Base for the half Fabric plugins: casts the arguments of the wrapped module's forward call."""

    _accumulating_module: Module | None = None
    _parallelism_checked = False

    @override
    def _after_convert(self, module: Module) -> None:
        self._remember(module)  # FlashPrecision's convert_module does not reach the base's
        if self.grad_accumulator is not None:
            # A Fabric loop steps when it likes: every backward between two steps is summed in the buffers.
            self._accumulating_module = module
            self.grad_accumulator.attach(module.named_parameters())

    @override
    def backward(self, tensor: Tensor, model: Module | None, *args: Any, **kwargs: Any) -> None:
        module = self._accumulating_module
        if self.grad_accumulator is None or module is None:
            return super().backward(tensor, model, *args, **kwargs)
        self.grad_accumulator.ensure_attached(module.named_parameters())  # sharded after convert_module?
        if not self._parallelism_checked:  # at the first backward: Fabric wraps or shards after convert_module
            self.grad_accumulator.check_parallelism(module.named_parameters(), where=type(self).__name__)
            self._parallelism_checked = True
        super().backward(tensor, model, *args, **kwargs)
        self.grad_accumulator.collect(module.named_parameters())  # FSDP2's sharded gradients
        self.grad_accumulator.end_micro_batch()

    def hand_over_gradients(self) -> None:
        """Put the fp32 sums back as ``param.grad`` (rounded once); Fabric's clipping and the optimizer step do this
        themselves, so call it only to read gradients in the loop between ``fabric.backward`` and the step."""
        if self.grad_accumulator is not None:
            self.grad_accumulator.hand_over()

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        self.hand_over_gradients()  # fabric.clip_gradients reads param.grad right after this
        super().unscale_gradients(optimizer)

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        self.hand_over_gradients()
        return super().optimizer_step(optimizer, **kwargs)

    @override
    def convert_input(self, data: Any) -> Any:
        """Cast the floating-point inputs of a forward call, keeping the preserved keys and positions.

        Fabric hands over the call as ``(args, kwargs)``. Integer positions in ``preserve_keys`` count the
        positional arguments (``model(audio, audio_len, tokens)``); a call with one tuple or list argument and no
        keywords (``model(batch)``) is the batch itself, whose positions they count, as under the Trainer. String
        patterns match mapping keys, fields and keyword-argument names (``model(x, audio=wave)``).
        """
        if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], dict)):
            self.check_preset_inputs(data)
            return self.cast_inputs(data)  # called directly with a batch
        args, kwargs = data
        if len(args) == 1 and not kwargs and isinstance(args[0], (list, tuple)):
            self.check_preset_inputs(args[0])
            return (self.cast_inputs(args[0]),), kwargs
        self.check_preset_inputs(args, kwargs)
        return self.cast_inputs(args), self.cast_inputs(kwargs)
