"""Summing micro-batch gradients in fp32 for half-precision parameters (``accumulate_grad_dtype="float32"``).

With ``accumulate_grad_batches=N`` autograd adds every micro-batch's gradient into ``param.grad``, which has the
parameter's dtype: under ``bf16-true`` (or FSDP2 with bf16 storage) the running sum is rounded to bf16 after every
addition, so late micro-batches lose their low bits against a grown sum. An :class:`Fp32GradAccumulator` keeps one
fp32 buffer per half parameter instead, as Megatron's ``main_grad`` does: each micro-batch's gradient is added into
the buffer and ``param.grad`` is released, so autograd never sums in half precision. Before the optimizer step (and
before gradient clipping) the buffer is handed back as ``param.grad``, rounded once to the parameter's dtype because
autograd requires a gradient of the parameter's dtype.

Memory: 4 bytes per half parameter while a step accumulates, instead of the 2-byte half gradient (the half gradient of
the micro-batch being added is released at once on plain tensors; FSDP2's sharded gradients are swept after each
backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from lightning_precision.dtypes import HALF_DTYPES, dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError

ACCUMULATE_GRAD_DTYPES = ("float32",)  # what ``accumulate_grad_dtype`` accepts besides ``None``

# The one accumulator hook each parameter may carry, across all accumulators: a second plugin attached to the same
# module (a Fabric set up again, a fit whose teardown never ran) replaces it. Two stacked hooks would let the older
# one take every gradient, so the newer run would step with none, and keep the older run alive through its closure.
_HOOK_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _always() -> bool:
    return True


def parse_accumulate_grad_dtype(value: Any, *, what: str) -> torch.dtype | None:
    """Validate an ``accumulate_grad_dtype`` argument: ``None`` (sum in the parameter's dtype) or float32.

    Args:
        value: ``None``, ``"float32"`` (``"fp32"``, ``"32"``, ``torch.float32``).
        what: The call, for the message (``"HalfPrecisionForAudio(accumulate_grad_dtype=...)"``).

    Raises:
        PrecisionConfigError: For any other value, naming it and the valid choices.
    """
    if value is None:
        return None
    try:
        dtype = parse_dtype(value, what=what)
    except PrecisionConfigError:
        dtype = None
    if dtype != torch.float32:
        raise PrecisionConfigError(
            f"`{what}` got {value!r}. Valid choices: None (sum micro-batch gradients in the parameter's dtype) or "
            f"{', '.join(repr(c) for c in ACCUMULATE_GRAD_DTYPES)}."
        )
    return dtype


def accumulation_dtype(
    storage_dtype: torch.dtype | None, accumulate_grad_dtype: torch.dtype | None
) -> torch.dtype | None:
    """The dtype in which micro-batch gradients of parameters stored in ``storage_dtype`` are summed.

    Autograd (and FSDP2's sharded gradient) sums in the parameter's dtype; fp32 buffers take over for half storage.
    """
    if accumulate_grad_dtype is not None and storage_dtype in HALF_DTYPES:
        return accumulate_grad_dtype
    return storage_dtype


def describe_accumulation(micro_batches: int | None, dtype: torch.dtype | str | None) -> str:
    """``"16 micro-batches summed in bfloat16"``, ``"1 micro-batch (no accumulation)"``, or for ``None`` (a Fabric
    loop, which decides itself) the dtype its sums would have."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if micro_batches is None:
        return f"decided by the training loop (a sum of param.grad is kept in {name})"
    if micro_batches <= 1:
        return "1 micro-batch (no accumulation)"
    return f"{micro_batches} micro-batches summed in {name}"


def accumulate_grad_dtype_of(*components: Any) -> torch.dtype | None:
    """The ``accumulate_grad_dtype`` set on any of a run's components (precision plugin, strategy), else ``None``."""
    for component in components:
        dtype = getattr(component, "accumulate_grad_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def trainer_accumulates(trainer: Any) -> bool:
    """Whether a Lightning Trainer sums several micro-batches into each optimizer step (automatic optimization with
    ``accumulate_grad_batches > 1``, read live: a ``GradientAccumulationScheduler`` changes it between epochs)."""
    if trainer is None:
        return False
    module = getattr(trainer, "lightning_module", None)
    return bool(getattr(module, "automatic_optimization", True)) and int(trainer.accumulate_grad_batches) > 1


class Fp32GradAccumulator:
    """fp32 buffers that take each micro-batch's gradient of half parameters, handed back before the step.

    Args:
        dtype: The buffers' dtype (float32).

    Two ways to feed it: :meth:`attach` registers post-accumulate-grad hooks on plain tensors (the half gradient is
    moved into the buffer as soon as autograd has written it), and :meth:`collect` sweeps gradients that something
    else wrote (FSDP2's sharded DTensor gradients, after each backward). :meth:`hand_over` puts the sums back as
    ``param.grad``. A parameter carries at most one accumulator's hook (attaching again replaces it), and
    :meth:`release` removes everything at the end of a run (the Trainer plugins' and the strategy's ``teardown``).
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.buffers: dict[Tensor, Tensor] = {}
        self._names: dict[Tensor, str] = {}
        self._handles: list[RemovableHandle] = []
        self._active: Callable[[], bool] = _always
        self._attached_ids: frozenset[int] = frozenset()  # the parameters the hooks were registered for
        self.micro_batches = 0  # micro-batches summed into the buffers since the last hand-over

    def tracked(self, named_params: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The trainable half parameters among ``named_params``: the only ones whose sum changes in fp32."""
        for name, param in named_params:
            if param.requires_grad and param.dtype in HALF_DTYPES:
                yield name, param

    def check_parallelism(self, named_params: Iterable[tuple[str, Tensor]], *, where: str) -> None:
        """Refuse replicated data parallelism (DDP), where the buffers would be wrong rather than just slow.

        DDP averages ``param.grad`` across processes inside the backward of the last micro-batch; the micro-batches
        before it sit in this rank's buffers, so they would never be averaged and every rank would step with a
        different gradient. Sharded (DTensor) parameters are fine: FSDP2 reduce-scatters each micro-batch before the
        buffers take it.

        Raises:
            PrecisionConfigError: If several processes train plain (non-DTensor) half parameters.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        plain = [name for name, param in self.tracked(named_params) if not isinstance(param, DTensor)]
        if plain:
            raise PrecisionConfigError(
                f"{where}: accumulate_grad_dtype='float32' cannot be used with {len(plain)} half-precision parameters "
                f"replicated over {dist.get_world_size()} processes (e.g. {plain[0]!r}): DDP averages param.grad "
                "inside the last micro-batch's backward, so the micro-batches summed in fp32 buffers before it would "
                "never be averaged across ranks. Valid choices here: accumulate_grad_dtype=None, or shard with "
                "FSDP2Strategy (strategy='fsdp2'), which reduce-scatters every micro-batch."
            )

    def attach(self, named_params: Iterable[tuple[str, Tensor]], active: Callable[[], bool] = _always) -> int:
        """Hook the trainable half parameters so each micro-batch's gradient goes into its buffer.

        Attaching again replaces the hooks, this accumulator's or another's: a parameter carries at most one.

        Args:
            named_params: ``module.named_parameters()``.
            active: Asked on every gradient; ``False`` leaves autograd's gradient alone (one micro-batch per step, or
                manual optimization, where the user's code owns the gradients).

        Returns:
            How many parameters were hooked.
        """
        self.detach()
        self._active = active
        # Forget parameters that were replaced (Fabric shards after convert_module): holding them would keep a full,
        # unsharded copy of the model alive on every rank. A pending sum keeps its name.
        self._names = {p: n for p, n in self._names.items() if p in self.buffers}
        ids = []
        for name, param in self.tracked(named_params):
            ids.append(id(param))
            self._names[param] = name
            if not isinstance(param, DTensor):  # FSDP2 writes sharded gradients itself: collect() sweeps those
                previous = _HOOK_OF.get(param)
                if previous is not None:
                    previous.remove()
                handle = param.register_post_accumulate_grad_hook(self._take)
                _HOOK_OF[param] = handle
                self._handles.append(handle)
        self._attached_ids = frozenset(ids)
        return len(self._handles)

    def ensure_attached(self, named_params: Iterable[tuple[str, Tensor]]) -> None:
        """Attach again if the module's parameters were replaced since :meth:`attach` (Fabric shards a module after
        its precision plugin converted it, and ``fully_shard`` swaps in new DTensor parameters)."""
        named = list(named_params)
        if frozenset(id(p) for _, p in self.tracked(named)) != self._attached_ids:
            self.attach(named, self._active)

    def detach(self) -> None:
        """Remove the hooks (the buffers stay until :meth:`hand_over`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def release(self) -> None:
        """Remove the hooks and forget the parameters, the buffers and the ``active`` predicate: what a teardown
        calls, so that nothing of the finished run keeps taking the module's gradients or keeps the run (the
        Trainer the predicate reads, the parameters of a replaced model) alive. A sum still pending is dropped."""
        self.detach()
        self.buffers.clear()
        self._names.clear()
        self._active = _always
        self._attached_ids = frozenset()
        self.micro_batches = 0

    def _take(self, param: Tensor) -> None:
        if param.grad is None or not self._active():
            return
        self._add(param, param.grad)
        param.grad = None  # autograd writes the next micro-batch's gradient fresh: never a half-precision sum

    def _add(self, param: Tensor, grad: Tensor) -> None:
        buffer = self.buffers.get(param)
        if buffer is None:
            self.buffers[param] = grad.to(self.dtype, copy=True)
        else:
            buffer.add_(grad)  # the half gradient is upcast exactly inside the add

    def collect(self, named_params: Iterable[tuple[str, Tensor]]) -> None:
        """Move the current gradients of the trainable half parameters into the buffers and release them; call after
        each backward, for what the hooks of :meth:`attach` cannot see (FSDP2's sharded parameters). Does nothing
        while inactive."""
        if not self._active():
            return
        for name, param in self.tracked(named_params):
            if param.grad is not None:
                self._names.setdefault(param, name)
                self._add(param, param.grad)
                param.grad = None

    def end_micro_batch(self) -> None:
        """Count one micro-batch (for the contract and the tests); the buffers do not depend on it."""
        if self.buffers:
            self.micro_batches += 1

    def hand_over(self) -> int:
        """Give each parameter its summed gradient as ``param.grad`` (rounded once to the parameter's dtype) and free
        the buffers. A gradient autograd wrote meanwhile (hooks inactive) is added first, so nothing is dropped.

        Returns:
            How many parameters got a gradient.
        """
        handed = 0
        while self.buffers:
            param, buffer = self.buffers.popitem()  # one buffer at a time: the peak is one parameter's extra copy
            if param.grad is not None:
                buffer.add_(param.grad)
            param.grad = buffer.to(param.dtype)
            handed += 1
        self.micro_batches = 0
        return handed

    def handing_over_after(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` (Lightning's training-step-and-backward closure), then :meth:`hand_over`: what a plugin or
        strategy passes on to the optimizer step, so the last micro-batch is summed before
        ``on_before_optimizer_step`` and clipping read ``param.grad``."""

        def closure_then_hand_over() -> Any:
            result = closure()
            self.hand_over()
            return result

        return closure_then_hand_over

    @property
    def pending(self) -> bool:
        """Whether a sum is waiting for the optimizer step."""
        return bool(self.buffers)

    def state_dict(self) -> dict[str, Any]:
        """The buffers by parameter name (empty between steps, when checkpoints are usually written)."""
        return {
            "dtype": dtype_name(self.dtype),
            "micro_batches": self.micro_batches,
            "buffers": {self._names[p]: b for p, b in self.buffers.items() if p in self._names},
        }

    def load_state_dict(self, state: dict[str, Any], named_params: Iterable[tuple[str, Tensor]]) -> None:
        """Restore :meth:`state_dict` onto the parameters of the same names.

        Raises:
            PrecisionConfigError: If a saved buffer names a parameter that is not a trainable half parameter here.
        """
        params = dict(self.tracked(named_params))
        saved = state.get("buffers", {})
        missing = sorted(set(saved) - set(params))
        if missing:
            raise PrecisionConfigError(
                f"The checkpoint holds fp32 gradient-accumulation buffers for {len(missing)} parameters that are not "
                f"trainable half-precision parameters of this model (e.g. {missing[0]!r})."
            )
        self.buffers = {params[n]: b.to(device=params[n].device, dtype=self.dtype) for n, b in saved.items()}
        self._names.update({p: n for n, p in params.items()})
        self.micro_batches = int(state.get("micro_batches", 0))
