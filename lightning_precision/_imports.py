"""Importing objects named by dotted paths in configs (``_target_``, ``class_path``)."""

from __future__ import annotations

import importlib
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
