"""Importing objects named by dotted paths in configs (``_target_``, ``class_path``)."""

from __future__ import annotations

import importlib
import types
from typing import Any

from lightning_precision.errors import PrecisionConfigError


def import_object(path: str, *, where: str = "_target_") -> Any:
    """Import the object named by ``path``: ``"torch.optim.AdamW"``, or a nested name such as ``"pkg.mod.Cls.Inner"``.

    Args:
        path: The dotted path.
        where: Where the path came from, for the message (e.g. ``"trainer.callbacks[0]"``).

    Raises:
        PrecisionConfigError: (a ``ValueError``) if the path is malformed, no prefix of it imports, or the
            attribute is missing. The message names ``path`` and ``where``.
    """
    parts = str(path).split(".")
    if len(parts) < 2 or not all(parts):
        raise PrecisionConfigError(f"{where}: bad _target_ {path!r}: expected a dotted path like 'torch.optim.AdamW'.")
    error: Exception | None = None
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError as err:
            error = error or err
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise PrecisionConfigError(
                    f"{where}: bad _target_ {path!r}: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r}."
                )
            obj = getattr(obj, attr)
        return obj
    raise PrecisionConfigError(f"{where}: bad _target_ {path!r}: cannot import it ({error}).")


def require_class(obj: Any, path: str, *, where: str, expected: str) -> type:
    """``obj``, imported from ``path``, if it is a class: a config names classes, and what it names is never called.

    Args:
        obj: What ``path`` imported to.
        path: The dotted path, for the message.
        where: Where the path came from (``"trainer.callbacks[0].class_path"``).
        expected: What a class there should be (``"a torch.optim.Optimizer subclass"``).

    Raises:
        PrecisionConfigError: If ``obj`` is a function, builtin, module or other non-class; the message names it.
    """
    if not isinstance(obj, type):
        raise PrecisionConfigError(
            f"{where}={path!r} names {_describe(obj)}, not a class: expected {expected}. It was not called."
        )
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "a module"
    if callable(obj):
        return f"a function ({type(obj).__name__})"
    return f"a {type(obj).__name__} value"
