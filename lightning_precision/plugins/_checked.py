"""The Trainer side of this library's plugins: the pairing check when Lightning connects the plugin, and input casting
of the batch. What the Fabric plugins share with them lives in :mod:`lightning_precision._plugin_common`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_precision._plugin_common import HalfInputsMixin, PairingCheckMixin
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.export_record import record_for_export
from lightning_precision.grad_accumulation import trainer_accumulates
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
        self._trainer = getattr(model, "_trainer", None)
        self.adopt_on_unsafe(trainer_components(self._trainer))
        self.judge_optimizers(optimizers)
        return model, optimizers, lr_schedulers

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Parameter names and the contract, so `lightning-precision export` needs no guessing (runs before callbacks:
        # a PrecisionGuard's contract replaces this one).
        record_for_export(checkpoint, getattr(self, "_trainer", None))


class _CheckedHalfInputs(HalfInputsMixin, _PairingCheck):
    """Base for the half Trainer plugins: Lightning hands ``convert_input`` the batch of ``training_step``; with
    ``accumulate_grad_dtype``, micro-batch gradients are summed in fp32 buffers and handed back before
    ``on_before_optimizer_step`` and gradient clipping."""

    _accumulating_module: Module | None = None  # the module the buffers' hooks are on, once connected
    _pending_accumulation: dict[str, Any] | None = None  # buffers loaded from a checkpoint before connect

    @override
    def convert_input(self, data: Any) -> Any:
        self.check_preset_inputs(data)
        return self.cast_inputs(data)

    @override
    def connect(
        self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[Module, list[Optimizer], list[Any]]:
        connected = super().connect(model, optimizers, lr_schedulers)
        if self.grad_accumulator is not None:
            trainer = getattr(model, "_trainer", None)
            # Only while Lightning accumulates: with one micro-batch per step there is no sum, and under manual
            # optimization the user's code owns the gradients between backward and step.
            self.grad_accumulator.check_parallelism(model.named_parameters(), where=type(self).__name__)
            self.grad_accumulator.attach(model.named_parameters(), active=lambda: trainer_accumulates(trainer))
            self._accumulating_module = model
            if self._pending_accumulation is not None:
                self.grad_accumulator.load_state_dict(self._pending_accumulation, model.named_parameters())
                self._pending_accumulation = None
        return connected

    @override
    def post_backward(self, tensor: Tensor, module: Module) -> Tensor:  # type: ignore[override]
        if self.grad_accumulator is not None:
            self.grad_accumulator.collect(module.named_parameters())  # sharded (FSDP2) gradients; hooks took the rest
            self.grad_accumulator.end_micro_batch()
        return super().post_backward(tensor, module)  # type: ignore[arg-type]

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Module, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if self.grad_accumulator is not None:
            closure = self.grad_accumulator.handing_over_after(closure)
        return super().optimizer_step(optimizer, model, closure, **kwargs)

    @override
    def teardown(self) -> None:
        """Remove the gradient hooks and buffers of ``accumulate_grad_dtype``: a later fit of the same module (with a
        new plugin or this one) must find its parameters as a first fit does, and must not keep this Trainer alive."""
        if self.grad_accumulator is not None:
            self.grad_accumulator.release()
        self._accumulating_module = None
        super().teardown()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.grad_accumulator is not None and self.grad_accumulator.pending:  # saved mid-accumulation
            state = {**state, "grad_accumulation": self.grad_accumulator.state_dict()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("grad_accumulation", None)
        super().load_state_dict(state)
        if saved is None:
            return
        if self.grad_accumulator is None:
            raise PrecisionConfigError(
                f"The checkpoint was saved while {type(self).__name__}(accumulate_grad_dtype='float32') was summing "
                "micro-batch gradients; this run has accumulate_grad_dtype=None and cannot continue that sum. Resume "
                "with accumulate_grad_dtype='float32'."
            )
        module = self._accumulating_module
        if module is None:
            self._pending_accumulation = saved  # restored when Lightning connects the module
        else:
            self.grad_accumulator.load_state_dict(saved, module.named_parameters())
