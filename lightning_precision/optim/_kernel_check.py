"""The check each compiled kernel of :class:`~lightning_precision.optim.CompensatedAdamW` passes before its first use
in a process: the same synthetic elements go through the compiled kernel and through the eager ops of the same math,
and the results must agree.

Why at run time, not only in the tests: what inductor generates depends on the installed torch (the package accepts a
range of releases, CI runs one), and the compiled step relies on things a torch release can change: the
``emulate_precision_casts`` option that keeps the bf16 rounding of each write (without it the compensation is
silently zero, upstream pytorch issues 179561 and 185337) and the code generation changes of ``_inductor_codegen``
(the loop step, the register bit casts), which reach into inductor's private code. A kernel that
fails the check is never used: the eager step runs instead, and a warning says why.

On CPU the two must be bitwise equal (the eager step is written to match inductor's rounding: ``tests/optim/
test_compiled_step.py``). On other devices the check allows an ulp of difference in the update (a GPU's division or
square root may round differently), but not a compensation lost: ``p + c`` must agree to 2**-14 of its magnitude,
while a folded rounding leaves errors of up to 2**-9.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# Elements of a flat check: two 32-lane vectors and a tail, so a vectorised loop's body and its remainder both run.
CHECK_NUMEL = 77
# Largest relative difference of p + c (other devices) and of a moment allowed off CPU.
_WEIGHT_TOLERANCE = 2.0**-14
_MOMENT_TOLERANCE = 2.0**-7
_NAMES = ("parameter", "exp_avg", "exp_avg_sq", "compensation")


class KernelMismatch(RuntimeError):
    """A compiled kernel's result differed from the eager step's on the check; it is not used."""


def kernel_kind(
    device_type: str, tensors: Sequence[torch.Tensor], stochastic: tuple, rows: bool, flags: tuple
) -> tuple:
    """What tells one compiled kernel from another, each checked once: the device, the dtypes of ``p, g, m, v, c``,
    which moments are rounded stochastically, a flat or a ``[rows, size]`` call, and the hyperparameter flags the
    kernel is specialised on (``flags``: the group's ``decays, maximize``)."""
    return (device_type, *(t.dtype for t in tensors), stochastic, rows, *flags)


def check_kernel(compiled: Callable[..., None], reference: Callable[..., None], template: tuple) -> None:
    """Run ``compiled`` and ``reference`` on the same synthetic elements shaped and typed like ``template``.

    Args:
        compiled: The compiled kernel (compiled here if this is its first call with these types).
        reference: The same update by the eager ops.
        template: A kernel call's arguments ``(p, g, m, v, c, scalars, flags, keys, base)``: the dtypes, the
            device, the scalars and hyperparameter flags are used, the tensors' values are not (a
            ``[rows, size]`` call is checked on two rows).

    Raises:
        KernelMismatch: Naming the state tensor that differs and by how much.
    """
    got, want = _synthetic(template), _synthetic(template)
    compiled(*got)
    reference(*want)
    reason = difference(got[:5], want[:5], exact=got[0].device.type == "cpu")
    if reason is not None:
        raise KernelMismatch(reason)


def _synthetic(template: tuple) -> tuple:
    p, g, m, v, c, scalars, flags, keys, base = template
    rows = p.dim() == 2
    shape = (2, CHECK_NUMEL) if rows else (CHECK_NUMEL,)
    gen = torch.Generator().manual_seed(0)  # the same elements on every rank and call

    def normal(scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen).mul_(scale)

    weights = normal(1.0)
    values = (
        weights.to(p.dtype),
        normal(1.0).to(g.dtype),
        normal(0.1).to(m.dtype),
        normal(0.1).square_().to(v.dtype),
        # A compensation of the size Kahan summation leaves: below half an ulp of the parameter.
        normal(2.0**-10).mul_(weights.abs()).to(c.dtype),
    )
    tensors = [t.to(p.device) for t in values]
    if rows:
        keys = tuple(None if k is None else k[:2].clone() for k in keys)
        base = None if base is None else base[:2].clone()
    return (*tensors, scalars, flags, keys, base)


def difference(got: tuple, want: tuple, *, exact: bool) -> str | None:
    """How the kernel's ``(p, g, m, v, c)`` differ from the eager step's, or None where they agree.

    Args:
        got: The compiled kernel's tensors.
        want: The eager step's.
        exact: Bitwise equality (CPU); else the tolerances of the module docstring.
    """
    p, c = got[0], got[4]
    if exact:
        for name, a, b in zip(_NAMES, (p, *got[2:4], c), (want[0], *want[2:4], want[4])):
            differ = int((_bits(a) != _bits(b)).sum())
            if differ:
                return f"{name}: {differ} of {a.numel()} elements differ bitwise"
        return None
    weight = (p.float() + c.float(), want[0].float() + want[4].float())
    pairs: list[tuple[str, Any, Any, float]] = [("parameter + compensation", *weight, _WEIGHT_TOLERANCE)]
    pairs += [(name, a.float(), b.float(), _MOMENT_TOLERANCE) for name, a, b in zip(_NAMES[1:3], got[2:4], want[2:4])]
    for name, a, b, tolerance in pairs:
        worst = float(((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
        if not worst <= tolerance:  # nan compares false
            return f"{name}: differs by up to {worst:.3g} of its magnitude (allowed: {tolerance:.3g})"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
