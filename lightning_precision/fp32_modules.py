"""Submodules that stay in fp32 under a half precision: parameters, buffers, inputs and the math inside them.

Some modules lose too much in bf16/fp16: an audio front end (a mel filterbank buffer applied to fp32 audio), norms,
rotary tables, MoE routers. Under ``HalfPrecisionForAudio``, ``FlashPrecision`` or ``FSDP2Strategy`` with
``fp32_modules=...``, the selected submodules keep fp32 parameters and buffers while the rest of the model is cast,
receive their floating-point inputs in fp32, compute in fp32 (torch's default dtype is fp32 inside them), and hand
their floating-point outputs on in the compute dtype, so the next half-precision layer gets what it expects.

A selector is a module type, or a string matched (shell-style, :mod:`fnmatch`) against the qualified module name
(``"frontend"``, ``"*.norm"``, ``"model.layers.*.mlp.gate"``) or the class name (``"LayerNorm"``). Names are relative
to the model given (the LightningModule); a name that matches nothing there is also tried relative to its submodules,
so the names of a Hugging Face model held as ``self.model`` work as written for that model (``"model.layers.0.mlp"``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_precision.casting import cast_batch
from lightning_precision.errors import PrecisionConfigError

Fp32ModuleSelector = str | type[nn.Module]
_MARK = "_lightning_precision_fp32_boundary"  # set on a module once its hooks are registered
_COMPUTE_DTYPE = "_lightning_precision_fp32_hands_on"  # the dtype its outputs are handed on in (the latest fit's)


def normalize_fp32_modules(
    fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None, *, what: str = "fp32_modules"
) -> tuple[Fp32ModuleSelector, ...]:
    """Validate the ``fp32_modules`` option.

    Raises:
        PrecisionConfigError: If an entry is neither a string nor an ``nn.Module`` subclass.
    """
    if fp32_modules is None:
        return ()
    if isinstance(fp32_modules, (str, type)) or not isinstance(fp32_modules, Iterable):
        fp32_modules = [fp32_modules]  # one entry; a number is refused below with the valid kinds
    entries = tuple(fp32_modules)
    bad = [e for e in entries if not (isinstance(e, str) or (isinstance(e, type) and issubclass(e, nn.Module)))]
    if bad:
        raise PrecisionConfigError(
            f"{what}={entries!r} has {bad!r}: give module-name patterns (e.g. 'frontend', '*.norm'), class names "
            "(e.g. 'LayerNorm') or nn.Module subclasses."
        )
    blank = [e for e in entries if isinstance(e, str) and not e.strip()]
    if blank:
        raise PrecisionConfigError(
            f"{what}={entries!r} has the empty name {blank[0]!r}, which would name the whole model: give submodule "
            "names (e.g. 'frontend', '*.norm'); to keep everything in fp32 use precision='32-true'."
        )
    return entries


def select_fp32_modules(model: nn.Module, selectors: Iterable[Fp32ModuleSelector]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` that a selector matches (a match covers everything below it).

    Raises:
        PrecisionConfigError: If a selector matches nothing, which would silently leave the module in half precision.
    """
    selectors = tuple(selectors)
    if not selectors:
        return []
    submodules = list(model.named_modules())[1:]  # the root is never kept by name: that is precision='32-true'
    # A name that matches nothing from the root is tried relative to every submodule (an HF model's own names).
    relative = {s for s in selectors if not any(_matches(s, n, m) for n, m in submodules)}
    selected: list[tuple[str, nn.Module]] = []
    missing = set(selectors)
    for name, module in submodules:
        matched = [s for s in selectors if _matches(s, name, module, anywhere=s in relative)]
        missing.difference_update(matched)
        inside = any(name.startswith(f"{outer}.") for outer, _ in selected)
        if matched and not inside:
            selected.append((name, module))
    if missing:
        raise PrecisionConfigError(_no_match_message([s for s in selectors if s in missing], model, submodules))
    _refuse_ties_across(model, selected)
    return selected


def _no_match_message(
    missing: list[Fp32ModuleSelector], model: nn.Module, submodules: list[tuple[str, nn.Module]]
) -> str:
    names = [n for n, _ in submodules] + sorted({type(m).__name__ for _, m in submodules})
    hints = []
    for selector in missing:
        close = difflib.get_close_matches(str(getattr(selector, "__name__", selector)), names, n=3, cutoff=0.5)
        hints.append(f"{selector!r}: closest {', '.join(map(repr, close))}" if close else f"{selector!r}: none close")
    return (
        f"fp32_modules entries {missing!r} match no submodule of {type(model).__name__} (nothing would stay fp32). "
        f"{'; '.join(hints)}. Module names look like: {', '.join(repr(n) for n, _ in submodules[:5])}."
    )


def _refuse_ties_across(model: nn.Module, selected: Sequence[tuple[str, nn.Module]]) -> None:
    """A parameter shared by a kept module and one outside it cannot be fp32 and half at once."""
    kept = {id(p): name for name, m in selected for p in m.parameters()}
    inside = {id(m) for _, outer in selected for m in outer.modules()}
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        for key, param in module.named_parameters(recurse=False):
            if id(param) in kept:
                raise PrecisionConfigError(
                    f"fp32_modules keeps {kept[id(param)]!r} in fp32, but its parameter is tied to "
                    f"{f'{name}.{key}' if name else key!r}, outside it, which stays in half precision: one tensor cannot "
                    "be both. Keep both modules in fp32 (add the other one to fp32_modules) or neither."
                )


def _matches(selector: Fp32ModuleSelector, name: str, module: nn.Module, *, anywhere: bool = False) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    if type(module).__name__ == selector or fnmatch.fnmatchcase(name, selector):
        return True
    return anywhere and fnmatch.fnmatchcase(name, f"*.{selector}")


def cast_keeping_fp32(
    model: nn.Module, kept: Sequence[tuple[str, nn.Module]], cast: Callable[[nn.Module], Any]
) -> None:
    """Run ``cast(model)`` while the parameters and buffers of ``kept`` stay fp32.

    Their tensors are set aside before the cast and put back after it, so they are never rounded through the half
    dtype (a model loaded in half precision has its kept modules upcast exactly).
    """
    params = {id(p): (p, p.data) for _, m in kept for p in m.parameters()}
    buffers = [(owner, key, buf) for _, m in kept for owner in m.modules() for key, buf in owner._buffers.items()]
    cast(model)
    for p, data in params.values():
        p.data = data.float() if data.is_floating_point() else data
    for owner, key, buf in buffers:
        if buf is not None:
            owner._buffers[key] = buf.float() if buf.is_floating_point() else buf


def add_fp32_boundaries(kept: Sequence[tuple[str, nn.Module]], compute_dtype: torch.dtype) -> None:
    """Make each kept module take fp32 inputs, compute with fp32 as the default dtype, and return ``compute_dtype``."""
    for _, module in kept:
        setattr(module, _COMPUTE_DTYPE, compute_dtype)  # a later fit under another precision hands on its own dtype
        if getattr(module, _MARK, False):
            continue
        module.register_forward_pre_hook(_enter_fp32, with_kwargs=True)
        module.register_forward_hook(_leave_fp32)
        setattr(module, _MARK, True)


def marked_fp32_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules of ``model`` that :func:`add_fp32_boundaries` already made fp32 (e.g. a precision plugin's
    ``fp32_modules``), outermost only, so a later step (sharding) can keep them fp32 too."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if getattr(module, _MARK, False) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


_DEFAULT_DTYPES: list[torch.dtype] = []  # the default dtype outside each kept module being run, innermost last


def _enter_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _DEFAULT_DTYPES.append(torch.get_default_dtype())
    torch.set_default_dtype(torch.float32)  # tensors the module creates (windows, masks) are fp32 too
    return cast_batch(args, torch.float32, None), cast_batch(kwargs, torch.float32, None)


def _leave_fp32(module: nn.Module, args: Any, output: Any) -> Any:
    if _DEFAULT_DTYPES:
        torch.set_default_dtype(_DEFAULT_DTYPES.pop())
    return cast_batch(output, getattr(module, _COMPUTE_DTYPE), None)
