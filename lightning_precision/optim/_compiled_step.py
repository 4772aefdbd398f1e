"""The compiled step of :class:`~lightning_precision.optim.CompensatedAdamW` (``implementation="compiled"``).

The same update as the eager chunked step (:func:`~lightning_precision.optim._compensated_step.compensated_chunk_`:
the math is written once), traced by ``torch.compile`` into one fused kernel per call: each element is read once
(bf16 ``p``, ``c``, ``g``, the moments) and written once, instead of the ~20 passes of the eager ops. That is what
makes a memory-bound step fast. A tensor of at least ``PACK_BELOW`` elements is one call on its own flat view; smaller
tensors are packed into few calls (``_compiled_packs``), so 5,000 small tensors cost a few hundred calls, not 5,000.

The trap this module must not fall into: inductor removes ``bf16 -> fp32 -> bf16`` round trips by default, so a
compiled Kahan step computes ``t - float(bf16(t)) == 0`` and its compensation is silently all zero (upstream pytorch
issues 179561 and 185337). The compile sets ``emulate_precision_casts`` for this function only (the config patches of
its inductor backend), never for the user's model; ``tests/optim/test_compiled_step.py`` fails if the compensation
differs from the eager step's by a single bit.

A call's hyperparameters and step scalars are one 1-D fp32 tensor (a row of a table built once per bucket and step:
each tensor argument costs the call its guards and wrappers) and sizes are dynamic, so a new learning rate, a new step
or a tensor of another size reuses the compiled kernel (the tests count recompiles). Inductor's on-disk FX graph
cache (on by default) makes the compile of a later run cheaper.
"""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from lightning_precision._logging import info_once, warn_once
from lightning_precision.optim import _compensated_step as eager
from lightning_precision.optim._compiled_packs import PACK_BELOW, guarded, step_packed, stream_inputs
from lightning_precision.optim._inductor_codegen import step_inductor
from lightning_precision.optim._kernel_check import KernelMismatch, check_kernel, kernel_kind
from lightning_precision.optim._stochastic_rounding import _MASK32, _mix32_, _shifted_right, range_bits

F32 = torch.float32
# implementation="auto" compiles for optimizers stepping at least this many elements: below it the first step's
# compile (seconds) costs more than the steps save.
AUTO_MIN_NUMEL = 2**20
# A kernel call's scalars: the group's constants (the first five fields of ``Hyper``), then the step scalars.
_NEG_STEP_SIZE, _BC2_SQRT = 5, 6
# Bytes per element of the flat buffers a pack gathers its operands into (p, g, m, v, c at their widest): the
# temporaries of a compiled call (the kernel fuses the update), which size the packs when chunk_size is automatic.
PACK_BYTES_PER_ELEMENT = 2 + 4 + 4 + 4 + 2


# Inductor's sqrt is correctly rounded, as the eager step's rounded sqrt is.
_OPS = SimpleNamespace(**{**vars(eager._TENSOR_OPS), "sqrt": torch.sqrt})


class _KeyedStream:
    """A :class:`~lightning_precision.optim._stochastic_rounding.RoundingStream` whose key and base index are int32
    tensors holding their uint32 bit patterns (inputs of the compiled kernel, not constants baked into it); for tensors
    whose local elements are one contiguous range of the full tensor with fewer than 2**32 elements (the stream's other
    cases take the eager step), so the int32 sum, wrapping modulo 2**32, is the global index itself.

    0-dim key and base: one flat tensor. 1-D ones: a ``[rows, size]`` pack of equal-size tensors, one row each, with
    that tensor's key and base, so every element draws the bits the tensor's own stream gives it.
    """

    def __init__(self, key: torch.Tensor, base: torch.Tensor) -> None:
        self.key, self.base = key, base

    def random_bits(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self.key.dim() == 0:
            return range_bits(start, stop, self.base, self.key, device)
        # A pack's rows (start is 0: a pack is one chunk); stop // rows elements per row.
        columns = torch.arange(stop // self.key.shape[0], dtype=torch.int32, device=device)
        index = columns.unsqueeze(0) + self.base.unsqueeze(1)
        return _shifted_right(_mix32_(index.bitwise_xor_(self.key.unsqueeze(1))), 16)


def _kernel(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    scalars: torch.Tensor,
    flags: tuple[bool, bool],
    keys: tuple[torch.Tensor | None, torch.Tensor | None],
    base: torch.Tensor | None,
) -> None:
    """One flat run of elements, or a ``[rows, size]`` pack of equal-size tensors (one row each): the eager step's
    chunk update, as one chunk of one piece (its elementwise ops do not see the shape). ``scalars`` is a row of
    :func:`kernel_scalars`, ``flags`` the group's ``(decays, maximize)``."""
    _same_shapes(p, (g, m, v, c), (k for k in (*keys, base) if k is not None and k.dim() == 1))
    _update(_OPS, p, g, m, v, c, scalars, flags, keys, base)


def _same_shapes(p: torch.Tensor, operands: Sequence[torch.Tensor], row_inputs: Any) -> None:
    """Tell the compiler that the operands have ``p``'s shape and a pack's per-row keys one entry per row.

    A first compile sees equal sizes and gives them one symbol, but a recompile does not: dynamo recompiles when the
    process's thread count or autocast state changes (its global-state guard), and then gives each input a size of
    its own. Inductor could not fuse the update into one loop over sizes it cannot prove equal: it wrote the second
    moment in a second loop that computed the update again, and the step ran 3.6x slower after a
    ``torch.set_num_threads`` call.
    """
    for t in operands:
        for dim in range(p.dim()):
            torch._check(t.shape[dim] == p.shape[dim])
    for t in row_inputs:
        torch._check(t.shape[0] == p.shape[0])


def eager_kernel(*args: Any) -> None:
    """:func:`_kernel`'s update run by the eager step's ops (its rounded sqrt): what the compiled kernel must give."""
    _update(eager._TENSOR_OPS, *args)


def _update(ops, p, g, m, v, c, scalars, flags, keys, base) -> None:
    hyper = eager.Hyper(*(scalars[i] for i in range(_NEG_STEP_SIZE)), *flags)
    n = p.shape[0]
    chunk = eager._Chunk([(0, 0, n)], ops=ops)

    def room(dtype: torch.dtype = F32) -> torch.Tensor:
        return torch.empty(p.shape, dtype=dtype, device=p.device)

    work = (room(), room(), None if m.dtype == F32 else room(), None if v.dtype == F32 else room())
    streams = [None if key is None else [_KeyedStream(key, base)] for key in keys]
    scratch = room(torch.int32) if base is not None else None
    eager.compensated_chunk_(
        chunk, eager.Bucket([p], [g], [m], [v], [c]), work, ([scalars[_NEG_STEP_SIZE]], [scalars[_BC2_SQRT]]), hyper,
        eager.StateRounding(*streams), scratch,
    )  # fmt: skip


def _rows_kernel(*args: Any) -> None:
    """:func:`_kernel` on ``[rows, size]`` packs: a code object of its own, so its compiled variants (hyperparameter
    flags, state dtypes, rounding) count against dynamo's recompile limit apart from the flat ones'."""
    _kernel(*args)


@functools.cache
def _compiled_kernel(rows: bool = False) -> Any:
    # emulate_precision_casts keeps the bf16 rounding of each write (see the module docstring); scoped to this compile,
    # and so are its code generation changes (``_inductor_codegen``: whole bf16 vectors a loop step, register bit casts).
    # dynamic_threads: the loop is an OpenMP parallel region whatever the size the kernel was first compiled at (the
    # check's few synthetic elements, which inductor would judge too small to share out: the step then ran on one
    # thread on any machine), and uses the threads of each call.
    backend = step_inductor({"emulate_precision_casts": True, "cpp.dynamic_threads": True})
    return torch.compile(_rows_kernel if rows else _kernel, backend=backend, dynamic=True, fullgraph=True)


def compiler_missing(device: torch.device) -> str | None:
    """Why this process cannot compile the step for ``device``, or None if it can (checked without compiling).

    Answered once per device type and process: the step asks at every step, and the look-up of the C++ compiler on
    ``PATH`` costs more than a small step's kernels.
    """
    return _compiler_missing(device.type)


@functools.cache
def _compiler_missing(device_type: str) -> str | None:
    if sys.platform == "win32":
        return "torch.compile's C++ backend is not set up on Windows here"
    if device_type == "cpu":
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
        if shutil.which(compiler) is None:
            return f"no C++ compiler ({compiler!r}) on PATH for inductor's CPU backend"
        return None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        return None
    return f"torch.compile is not used for device type {device_type!r}"


def kernel_scalars(hyper: eager.Hyper, neg_step_size: torch.Tensor, bc2_sqrt: torch.Tensor) -> torch.Tensor:
    """The kernel's scalars of a bucket's tensors: row ``i`` holds the group's five fp32 constants, then tensor ``i``'s
    ``-lr / bc1`` and ``sqrt(bc2)`` (``neg_step_size``, ``bc2_sqrt``: 1-D fp32 tensors on the tensors' device)."""
    constants = torch.tensor(hyper[:_NEG_STEP_SIZE], dtype=F32).to(neg_step_size.device, non_blocking=True)
    count = neg_step_size.shape[0]
    return torch.cat([constants.expand(count, -1), neg_step_size.unsqueeze(1), bc2_sqrt.unsqueeze(1)], dim=1)


def compiled_compensated_step(
    bucket: eager.Bucket,
    scalars: tuple[torch.Tensor, torch.Tensor],
    options: eager.StepOptions,
    rounding: eager.StateRounding | None,
    finite: torch.Tensor | None,
    steps: Sequence[float],
    calls: list[int] | None = None,
) -> None:
    """The compensated update of a bucket, as the eager :func:`compensated_step` computes it, with compiled kernels.

    Args:
        bucket: Flat local views of half-precision parameters, gradients, moments and compensations.
        scalars: Per-tensor ``-lr / bc1`` and ``sqrt(bc2)``: two 1-D fp32 tensors on the tensors' device (small
            tensors' scalars are gathered from them by index lists).
        options: The group's hyperparameters; ``chunk_size`` bounds the packs of small tensors.
        rounding: Streams of the moments written with stochastic rounding (their layouts must have a ``base`` and
            fewer than 2**32 elements: :func:`can_compile` checks it).
        finite: Per-tensor finite-gradient flags on an accelerator, or None.
        steps: The tensors' step counts (after this step, host values): tensors packed together share one.
        calls: Appended to after each kernel call (how far the step got if a later call raises).
    """
    params = bucket.params
    device = params[0].device
    hyper = eager.Hyper.of(options)
    rounding = rounding or eager.StateRounding()
    kernel = _Kernel([] if calls is None else calls, kernel_scalars(hyper, *scalars), (hyper.decays, hyper.maximize))
    kernel.check_before_writes(bucket, rounding)

    small: list[int] = []
    for i, p in enumerate(params):
        if p.numel() < PACK_BELOW:
            small.append(i)
            continue
        guard = None if finite is None else eager._Guard(eager._Chunk([(i, 0, p.numel())]), finite, guarded(bucket))
        kernel(*(t[i] for t in bucket), i, *stream_inputs(rounding, i, device))
        if guard is not None:
            guard.restore()
    by_step: dict[float, list[int]] = {}
    for i in small:
        by_step.setdefault(steps[i], []).append(i)
    for same_step in by_step.values():
        step_packed(kernel, bucket, same_step, scalars, rounding, finite, options)
    kernel.run_deferred()


class _Kernel:
    """The compiled kernel as the step calls it, and the eager steps of the few tensors it does not take.

    Each kernel (flat or rows, per device, dtypes, rounding and flags) is compiled and checked against the eager ops
    (:mod:`~lightning_precision.optim._kernel_check`) on synthetic elements before its first use in this process, and
    before the bucket's first write: a compile can fail after dynamo has run the function eagerly (a frame it skips),
    and a kernel can compute wrongly, and the eager fallback must then find every tensor as it was. For the same
    reason the eager steps wait until every kernel call of the bucket has been made.
    """

    def __init__(self, calls: list[int], scalars: torch.Tensor, flags: tuple[bool, bool]) -> None:
        self.calls = calls
        self.scalars, self.flags = scalars, flags
        self.deferred: list[tuple[Any, tuple]] = []
        # What tells this bucket's kernels apart (its tensors share the other dtypes, the device and the flags).
        self.seen: set[tuple] = set()

    def __call__(self, p, g, m, v, c, index: int, keys: tuple, base: torch.Tensor | None) -> None:
        """One kernel call on ``p, g, m, v, c`` with the step scalars of the bucket's tensor ``index``."""
        # Detached aliases: a parameter's requires_grad, or the table a row views (its number of rows), would
        # otherwise be a guard, and a recompile, of its own.
        row = self.scalars[index].detach()
        args = (p.detach(), g.detach(), m.detach(), v.detach(), c.detach(), row, self.flags, keys, base)
        seen = (g.dtype, p.dim() == 2, keys[0] is None, keys[1] is None)
        if seen not in self.seen:
            self.check(args)
            self.seen.add(seen)
        _compiled_kernel(p.dim() == 2)(*args)
        self.calls.append(1)

    @staticmethod
    def check(args: tuple) -> None:
        """Compile and check the kernel a call with these arguments takes, if not yet done in this process."""
        kind = kernel_kind(
            args[0].device.type, args[:5], tuple(k is not None for k in args[7]), args[0].dim() == 2, args[6]
        )
        if kind not in _checked:
            check_kernel(_compiled_kernel(args[0].dim() == 2), eager_kernel, args)
            _checked.add(kind)

    def check_before_writes(self, bucket: eager.Bucket, rounding: eager.StateRounding) -> None:
        """Check the kernels this bucket may call (flat; rows for small tensors rounded stochastically) up front;
        once checked, a kernel costs this a few lookups per step."""
        device = bucket.params[0].device
        stochastic = tuple(s is not None for s in rounding)
        first = [t[0] for t in bucket]
        for rows in (False, True):
            if kernel_kind(device.type, first, stochastic, rows, self.flags) in _checked:
                continue
            if rows and not (any(stochastic) and any(p.numel() < PACK_BELOW for p in bucket.params)):
                continue  # this bucket makes no [rows, size] call
            shape = (2,) if rows else ()
            keys = tuple(torch.zeros(shape, dtype=torch.int32, device=device) if s else None for s in stochastic)
            base = torch.zeros(shape, dtype=torch.int32, device=device) if any(stochastic) else None
            template = [t.view(1, -1) if rows else t for t in first]
            # The scalars as a call takes them: a detached row of the table.
            self.check((*template, self.scalars[0].detach(), self.flags, keys, base))

    def later(self, function: Any, *args: Any) -> None:
        """Run ``function(*args)`` once the kernel calls are made."""
        self.deferred.append((function, args))

    def run_deferred(self) -> None:
        for function, args in self.deferred:
            function(*args)
            self.calls.append(1)


def can_compile(rounding: eager.StateRounding | None) -> bool:
    """Whether the compiled kernel can draw these streams' bits (contiguous-range layouts under 2**32 elements)."""
    for streams in rounding or ():
        if streams is not None and any(s.layout.base is None or s.layout.global_numel > _MASK32 for s in streams):
            return False
    return True


# Devices whose compile failed in this process (the eager step runs for them from then on), with the reason.
_failed: dict[str, str] = {}
# Kernels (device, dtypes, stochastic moments, rows, flags) compiled and checked in this process.
_checked: set[tuple] = set()


def wanted(implementation: str, device: torch.device, stepped_numel: int, rounding: eager.StateRounding | None) -> bool:
    """Whether a half-precision bucket takes the compiled step.

    ``"compiled"`` always, ``"auto"`` for optimizers stepping at least ``AUTO_MIN_NUMEL`` elements; either only where
    the step can compile. Where ``"compiled"`` was asked and cannot be had, a warning says why, once per cause; for
    ``"auto"`` the log says it once.
    """
    if implementation not in ("auto", "compiled") or (implementation == "auto" and stepped_numel < AUTO_MIN_NUMEL):
        return False
    reason = _failed.get(device.type) or compiler_missing(device)
    if reason is None and not can_compile(rounding):
        reason = "the stochastic rounding of a tensor sharded off its first dimension, or of 2**32 elements or more"
    if reason is None:
        return True
    _say_fallback(implementation, reason)
    return False


def _say_fallback(implementation: str, reason: str) -> None:
    message = f"CompensatedAdamW: the eager step runs instead of the compiled one ({reason}); same result, slower."
    if implementation == "compiled":
        warn_once(f"compiled-step-fallback:{reason}", message)
    else:
        info_once(f"compiled-step-fallback:{reason}", message)


def run(bucket, scalars, options, rounding, finite, steps) -> bool:
    """Step a bucket with :func:`compiled_compensated_step`; False (nothing changed) if a kernel could not be had.

    Every kernel a bucket may call is compiled and checked before its first write (:class:`_Kernel`), so a compile
    that fails (dynamo's recompile limit included) or a kernel that fails the check leaves every tensor as it was,
    and the eager step runs, from then on for this device, with a warning. A failure once a kernel has written is
    raised: the eager step must not step a tensor twice.
    """
    calls: list[int] = []
    try:
        compiled_compensated_step(bucket, scalars, options, rounding, finite, steps, calls)
    except Exception as error:
        if calls:
            raise
        if isinstance(error, KernelMismatch):
            reason = f"its compiled kernel did not match the eager step on a check: {error}"
        else:
            reason = f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        _failed[bucket.params[0].device.type] = reason
        _say_fallback("compiled", reason)  # a warning even under "auto": the compiler failed
        return False
    return True
