"""Classes a config names (``class_path``, ``_target_``), imported and read but never built.

``explain`` reads untrusted YAML: building what a file names runs its code (``class_path: os.system`` with
``init_args: {command: ...}`` is a shell command), so a config's plugins, callbacks and strategy become
:class:`ClassSpec` objects there: the class and the arguments it would get. What the plan needs from them (the
precision, an explicit ``on_unsafe``, ``accumulate_grad_dtype``) is read from those arguments and the class's signature
defaults. ``train`` builds them, but only after :func:`import_class` has checked that each names a class.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_precision._imports import import_object, require_class
from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError

# What each kind of entry should name, for the refusal.
EXPECTED = {
    "plugins": "a plugin class (e.g. lightning_precision.HalfPrecisionForAudio)",
    "callbacks": "a callback class (e.g. lightning.pytorch.callbacks.LearningRateMonitor)",
    "strategy": "a strategy class (e.g. lightning_precision.strategies.FSDP2Strategy)",
    "optimizer": "an optimizer class (e.g. torch.optim.AdamW)",
    "nested": "a class (Hydra builds a nested _target_ too)",
}


@dataclass(frozen=True)
class ClassSpec:
    """A class named by a config and the keyword arguments it would be built with (it is not built).

    Attributes:
        cls: The class.
        init_args: Its keyword arguments as written (LightningCLI ``init_args``, or Hydra's keys without ``_``).
        where: The config key (``"trainer.plugins[0]"``), for messages.
    """

    cls: type
    init_args: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument as given, else the signature's default, else ``default``."""
        if name in self.init_args:
            return self.init_args[name]
        param = _parameters(self.cls).get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
        return default


def class_of(component: Any) -> type:
    """The class of a built component or of a :class:`ClassSpec`."""
    return component.cls if isinstance(component, ClassSpec) else type(component)


def is_a(component: Any, base: type) -> bool:
    """``isinstance`` for built components, ``issubclass`` for specs."""
    return issubclass(component.cls, base) if isinstance(component, ClassSpec) else isinstance(component, base)


def option_of(component: Any, name: str, default: Any = None) -> Any:
    """An option of a built component (its attribute) or of a spec (argument, else signature default)."""
    if isinstance(component, ClassSpec):
        return component.arg(name, default)
    return getattr(component, name, default)


def import_class(path: str, *, where: str, kind: str) -> type:
    """Import what ``path`` names and insist that it is a class; nothing is called.

    Args:
        path: The dotted path (``"torch.optim.AdamW"``).
        where: The full key that holds it (``"trainer.strategy.class_path"``).
        kind: Which entry it is, a key of :data:`EXPECTED`.

    Raises:
        PrecisionConfigError: If it does not import, or names a function, a module or any other non-class.
    """
    return require_class(import_object(path, where=where), path, where=where, expected=EXPECTED[kind])


def read_entry(entry: Any, where: str, kind: str) -> Any:
    """A ``class_path`` or ``_target_`` mapping as a :class:`ClassSpec`; anything else is returned as is.

    Raises:
        PrecisionConfigError: If the mapping names no class, or an argument the class does not take.
    """
    if not isinstance(entry, Mapping):
        return entry
    if "class_path" in entry:
        cls = import_class(str(entry["class_path"]), where=f"{where}.class_path", kind=kind)
        args = entry.get("init_args") or {}
        if not isinstance(args, Mapping):
            raise PrecisionConfigError(f"{where}.init_args must be a mapping of arguments, got {args!r}.")
    elif "_target_" in entry:
        cls = import_class(str(entry["_target_"]), where=f"{where}._target_", kind=kind)
        args = {k: v for k, v in entry.items() if not str(k).startswith("_")}  # _target_, _convert_, ...
    else:
        raise PrecisionConfigError(
            f"{where}: a mapping needs '_target_' or 'class_path' to be built, got {dict(entry)!r}."
        )
    check_arguments(cls, dict(args), where)
    return ClassSpec(cls, dict(args), where)


def check_arguments(cls: type, args: Mapping[str, Any], where: str) -> None:
    """Refuse an argument the class's ``__init__`` does not take (as building it would), naming it."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # some extension classes have no signature: nothing to check against
        return
    try:
        signature.bind_partial(**args)
    except TypeError as err:
        valid = [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise PrecisionConfigError(
            f"{where}: {cls.__name__} does not take the argument(s) given ({err}); it takes: {', '.join(valid)}."
        ) from err


def construct(
    factory: Any, args: Mapping[str, Any], *, where: str, name: str, shown: Mapping[str, Any] | None = None
) -> Any:
    """Build what a config names: a constructor's own error becomes a config error naming what was built.

    The user's class raised it (``ModelCheckpoint(every_n_train_steps=-1)``), so it is reported as bad input, with
    the original exception chained (``--debug`` shows it). The library's own errors pass through unchanged.

    Args:
        factory: What builds it (the class, or a function that builds it from ``args``).
        args: Its keyword arguments.
        where: The config key, for the message.
        name: What is built, for the message (the ``_target_`` or class name).
        shown: The arguments to show in the message (default: ``args``).

    Raises:
        PrecisionConfigError: If building raised anything but a library error.
    """
    try:
        return factory(**args)
    except (PrecisionConfigError, PrecisionPairingError):
        raise
    except Exception as err:  # user-named code: reported with its name, the cause chained
        given = ", ".join(f"{k}={v!r}" for k, v in (args if shown is None else shown).items())
        cause = getattr(err, "__cause__", None) or err  # Hydra wraps the constructor's error: show the original
        raise PrecisionConfigError(
            f"{where}: building {name}({given}) failed: {type(cause).__name__}: {cause}"
        ) from err


def check_nested_targets(value: Any, where: str, kind: str) -> None:
    """Hydra builds every nested ``_target_`` too: each must name a class (checked before anything is built)."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            import_class(str(value["_target_"]), where=f"{where}._target_", kind=kind)
        for key, item in value.items():
            if key != "_target_":
                check_nested_targets(item, f"{where}.{key}", "nested")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_nested_targets(item, f"{where}[{i}]", "nested")


def check_optimizer_target(optimizer: Any, where: str) -> None:
    """An optimizer section's ``_target_`` must name a class. One that does not import is left to the catalogue,
    which classifies it by its path (apex, NeMo: not installed where ``explain`` runs)."""
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("_target_"), str):
        return
    try:
        obj = import_object(optimizer["_target_"], where=f"{where}._target_")
    except PrecisionConfigError:
        return
    require_class(obj, optimizer["_target_"], where=f"{where}._target_", expected=EXPECTED["optimizer"])


def _parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
