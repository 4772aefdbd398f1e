"""Submodules and tensors that stay in fp32 under a half precision.

Some modules lose too much in bf16/fp16: an audio front end (a mel filterbank buffer applied to fp32 audio), norms,
rotary tables, MoE routers. Under ``HalfPrecisionForAudio``, ``FlashPrecision`` or ``FSDP2Strategy`` with
``fp32_modules=...``, the selected submodules keep fp32 parameters and buffers while the rest of the model is cast,
receive their floating-point inputs in fp32 (a half ``torch.dtype`` argument, such as diffusers' ``hidden_dtype``,
arrives as float32), compute in fp32 (torch's default dtype is fp32 inside them), and hand their floating-point
outputs on in the compute dtype, so the next half-precision layer gets what it expects.

A selector is a module type, or a string matched (shell-style, :mod:`fnmatch`) against the qualified module name
(``"frontend"``, ``"*.norm"``, ``"model.layers.*.mlp.gate"``) or the class name (``"LayerNorm"``). Names are relative
to the model given (the LightningModule); a name that matches nothing there is tried relative to one of its
submodules, so the names of a Hugging Face model held as ``self.model`` work as written for that model
(``"model.layers.0.mlp"`` for ``model.model.layers.0.mlp``); a name that matches under two submodules (an encoder's
and a decoder's ``layers.0``) is refused, naming both. A string that names no module is matched the same way against
parameter and buffer names (LitGPT's root-level rotary buffers ``"cos"``, ``"sin"``): the plugins keep such a tensor's
storage fp32 and leave its math to the code that uses it.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_precision.casting import cast_batch
from lightning_precision.dtypes import HALF_DTYPES
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


@dataclass(frozen=True)
class Fp32Selection:
    """What stays fp32 in a model.

    Attributes:
        modules: ``(name, module)`` of the outermost kept submodules (fp32 storage, inputs and math).
        tensors: ``(name, owner, key)`` of parameters and buffers kept by name outside those modules (fp32 storage
            only: the code that uses them decides the math).
    """

    modules: list[tuple[str, nn.Module]]
    tensors: list[tuple[str, nn.Module, str]]

    @property
    def names(self) -> tuple[str, ...]:
        """The qualified names of the kept modules and tensors, for the contract."""
        return (*(n for n, _ in self.modules), *(n for n, _, _ in self.tensors))


def select_fp32(
    model: nn.Module, selectors: Iterable[Fp32ModuleSelector], *, also: Sequence[tuple[str, nn.Module]] = ()
) -> Fp32Selection:
    """What stays fp32 in ``model``: the outermost submodules a selector (or ``also``) names, and the parameters and
    buffers a selector names outside them.

    A string is matched against the module names and class names relative to ``model``; if it matches none, against
    the module names relative to one submodule (a Hugging Face model held as ``self.model`` takes its own names); if
    still none, against the parameter and buffer names, the same two ways. A type selects modules.

    Args:
        model: The model about to be cast.
        selectors: Normalized ``fp32_modules`` entries (:func:`normalize_fp32_modules`).
        also: Submodules of ``model`` kept fp32 for another reason (trainable adapters), merged with the selected.

    Raises:
        PrecisionConfigError: If a selector matches nothing (naming the closest names), matches under two submodules
            (naming both), or a parameter is tied across the fp32 boundary.
    """
    selectors = tuple(selectors)
    submodules = list(model.named_modules())[1:]  # the root is never kept by name: that is precision='32-true'
    tensors = _named_tensors(model) if selectors else {}
    chosen = {name for name, _ in also}
    chosen_tensors: list[str] = []
    missing = []
    for selector in selectors:
        if isinstance(selector, type):
            of_type = [n for n, m in submodules if isinstance(m, selector)]
            chosen.update(of_type)
            missing += [] if of_type else [selector]
            continue
        by_class = [n for n, m in submodules if type(m).__name__ == selector]
        names = by_class + _resolve(selector, [n for n, _ in submodules], root_hits=bool(by_class))
        if names:
            chosen.update(names)
        elif names := _resolve(selector, list(tensors)):
            chosen_tensors += names
        else:
            missing.append(selector)
    if missing:
        raise PrecisionConfigError(_no_match_message(missing, model, submodules, list(tensors)))
    modules: list[tuple[str, nn.Module]] = []
    for name, module in submodules:  # parents come before their children
        if name in chosen and not _inside(name, modules):
            modules.append((name, module))
    _refuse_ties_across(model, modules)
    kept_tensors = [(n, *tensors[n]) for n in dict.fromkeys(chosen_tensors) if not _inside(n, modules)]
    return Fp32Selection(modules, kept_tensors)


def select_fp32_modules(model: nn.Module, selectors: Iterable[Fp32ModuleSelector]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` that a selector matches (a match covers everything below it), for the
    FSDP2 sharding, whose fp32 units are modules (see :func:`select_fp32`).

    Raises:
        PrecisionConfigError: As :func:`select_fp32`, and if a selector names parameters or buffers.
    """
    selection = select_fp32(model, selectors)
    if selection.tensors:
        names = [n for n, _, _ in selection.tensors]
        raise PrecisionConfigError(
            f"fp32_modules names the tensors {names!r}, but FSDP2 keeps whole modules in fp32 (each its own fp32 unit): "
            "name the module that holds them, or keep them with the precision plugin (HalfPrecisionForAudio, "
            "FlashPrecision), whose fp32_modules also take parameter and buffer names."
        )
    return selection.modules


def _named_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every parameter and buffer by qualified name (tied ones under each name) -> (owning module, key)."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                found.setdefault(f"{prefix}.{key}" if prefix else key, (module, key))
    return found


def _resolve(selector: str, names: list[str], *, root_hits: bool = False) -> list[str]:
    """The names ``selector`` matches from the root; if none (and ``root_hits`` is false), those it matches relative
    to one outermost prefix.

    Raises:
        PrecisionConfigError: If it matches relative to two prefixes neither of which holds the other.
    """
    hits = [n for n in names if fnmatch.fnmatchcase(n, selector)]
    if hits or root_hits:
        return hits
    by_prefix: dict[str, list[str]] = {}
    for name in names:
        for i, char in enumerate(name):
            if char == "." and fnmatch.fnmatchcase(name[i + 1 :], selector):
                by_prefix.setdefault(name[:i], []).append(name)
    outer = [p for p in by_prefix if not any(p.startswith(f"{q}.") for q in by_prefix)]
    if len(outer) > 1:
        first, second = outer[:2]
        raise PrecisionConfigError(
            f"fp32_modules entry {selector!r} matches under two submodules: {first!r} ({by_prefix[first][0]!r}) and "
            f"{second!r} ({by_prefix[second][0]!r}). Write the full name (e.g. {by_prefix[first][0]!r}), or a "
            f"pattern for all of them (e.g. {'*.' + selector!r})."
        )
    return list(dict.fromkeys(by_prefix[outer[0]])) if outer else []


def _inside(name: str, modules: Sequence[tuple[str, nn.Module]]) -> bool:
    return any(name.startswith(f"{outer}.") for outer, _ in modules)


def _no_match_message(
    missing: list[Fp32ModuleSelector],
    model: nn.Module,
    submodules: list[tuple[str, nn.Module]],
    tensor_names: list[str],
) -> str:
    names = [n for n, _ in submodules] + sorted({type(m).__name__ for _, m in submodules}) + tensor_names
    hints = []
    for selector in missing:
        close = difflib.get_close_matches(str(getattr(selector, "__name__", selector)), names, n=3, cutoff=0.5)
        hints.append(f"{selector!r}: closest {', '.join(map(repr, close))}" if close else f"{selector!r}: none close")
    return (
        f"fp32_modules entries {missing!r} match no submodule, parameter or buffer of {type(model).__name__} (nothing "
        f"would stay fp32). {'; '.join(hints)}. Module names look like: "
        f"{', '.join(repr(n) for n, _ in submodules[:5])}."
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


def cast_keeping_fp32(
    model: nn.Module,
    kept: Sequence[tuple[str, nn.Module]],
    cast: Callable[[nn.Module], Any],
    tensors: Sequence[tuple[str, nn.Module, str]] = (),
) -> None:
    """Run ``cast(model)`` while the parameters and buffers of ``kept``, and the ``tensors`` (``(name, owner, key)``
    of :attr:`Fp32Selection.tensors`), stay fp32.

    Their tensors are set aside before the cast and put back after it, so they are never rounded through the half
    dtype (a model loaded in half precision has its kept modules upcast exactly).
    """
    # The storage is set aside, not the tensor object: a cast may reassign ``.data`` of the very object (flashoptim
    # does so for buffers too), which would round what was set aside.
    params = {id(p): (p, p.data) for _, m in kept for p in m.parameters()}
    buffers = [(o, k, b, b.data) for _, m in kept for o in m.modules() for k, b in o._buffers.items() if b is not None]
    for _, owner, key in tensors:
        if key in owner._parameters:
            param = owner._parameters[key]
            params[id(param)] = (param, param.data)
        else:
            buffer = owner._buffers[key]
            buffers.append((owner, key, buffer, buffer.data))
    cast(model)
    for p, data in params.values():
        p.data = data.float() if data.is_floating_point() else data
    for owner, key, buffer, data in buffers:
        buffer.data = data.float() if data.is_floating_point() else data
        owner._buffers[key] = buffer


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
    # A dtype passed in for its math (diffusers' ``hidden_dtype``) would cast back to half inside: it computes in fp32.
    args = tuple(map(_fp32_dtype, args))
    kwargs = {key: _fp32_dtype(value) for key, value in kwargs.items()}
    return cast_batch(args, torch.float32, None), cast_batch(kwargs, torch.float32, None)


def _fp32_dtype(value: Any) -> Any:
    return torch.float32 if isinstance(value, torch.dtype) and value in HALF_DTYPES else value


def _leave_fp32(module: nn.Module, args: Any, output: Any) -> Any:
    if _DEFAULT_DTYPES:
        torch.set_default_dtype(_DEFAULT_DTYPES.pop())
    return cast_batch(output, getattr(module, _COMPUTE_DTYPE), None)
