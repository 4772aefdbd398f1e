"""Resolving only what the library reads from an OmegaConf config, each value named by its path when it fails.

A NeMo model section is full of values the library never reads: ``???`` placeholders that NeMo's scripts fill in
(``train_ds.manifest_filepath: ???``) and interpolations through resolvers that only the app registers
(``${sum:...}``). Resolving the whole section would fail on them, so only the parts the config layouts read are
resolved (:data:`~lightning_precision.config_layouts.MODEL_READ_PATHS`): the optimizer sections (NeMo's scheduler
``model.optim.sched`` excepted) and ``torch_dtype``. A value that is read and does not resolve is an error naming its
path; one that is not read stays untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lightning_precision.config_layouts import MODEL_READ_PATHS, NEMO_SCHEDULER_KEY
from lightning_precision.errors import PrecisionConfigError


def resolve_value(value: Any, *, path: str) -> Any:
    """``value`` as plain data (dicts, lists, scalars) with its interpolations resolved.

    Args:
        value: An OmegaConf node, a mapping or list holding some, or a plain value.
        path: Where it sits in the whole config (``"model.optim"``), for messages.

    Raises:
        PrecisionConfigError: If a value in it is ``???`` or does not resolve (an unknown resolver, an interpolation
            to a missing key); the message names that value's path.
    """
    if isinstance(value, (DictConfig, Mapping)):
        if isinstance(value, DictConfig) and value._is_none():
            return None
        return {key: resolve_value(_child(value, key, path), path=f"{path}.{key}") for key in value}
    if isinstance(value, (ListConfig, list, tuple)):
        if isinstance(value, ListConfig) and value._is_none():
            return None
        items = [resolve_value(_child(value, i, path), path=f"{path}[{i}]") for i in range(len(value))]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def model_read_part(
    model: Any, *, what: str = "model", paths: tuple[str, ...] = MODEL_READ_PATHS
) -> dict[str, Any] | None:
    """The parts of a model section that the config layouts read, resolved; the rest is left out unresolved.

    Args:
        model: The model section (OmegaConf, mapping), or ``None``.
        what: Its path, for messages.
        paths: What to read, relative to the section (default: everything the layouts read).

    Returns:
        A plain dict with only the keys of ``paths`` that are set (``optim`` without its ``sched``), or ``None``
        without a model section.

    Raises:
        PrecisionConfigError: If the section is not a mapping, or a value that is read does not resolve (named).
    """
    if model is None:
        return None
    if not isinstance(model, (Mapping, DictConfig)) or (isinstance(model, DictConfig) and model._is_none()):
        raise PrecisionConfigError(f"The {what} section must be a mapping, got {type(model).__name__}: {model!r}.")
    part: dict[str, Any] = {}
    for read_path in paths:
        *parents, last = read_path.split(".")
        node, out, where = model, part, what
        for key in parents:
            node = _child(node, key, where) if _has(node, key) else None
            where = f"{where}.{key}"
            if not isinstance(node, (Mapping, DictConfig)):
                break
            out = out.setdefault(key, {})
        else:
            if _has(node, last):
                out[last] = _read(node, last, f"{where}.{last}")
    return part


def _read(node: Any, key: str, path: str) -> Any:
    value = _child(node, key, path.rpartition(".")[0])
    if key == "optim" and isinstance(value, (Mapping, DictConfig)):
        # NeMo's scheduler is not an optimizer argument: it may hold ??? or interpolate what only the app knows.
        return {k: resolve_value(_child(value, k, path), path=f"{path}.{k}") for k in value if k != NEMO_SCHEDULER_KEY}
    return resolve_value(value, path=path)


def _has(node: Any, key: str) -> bool:
    # keys(), not ``in``: OmegaConf's ``in`` is False for a ``???`` value, which must be reported, not skipped.
    return isinstance(node, (Mapping, DictConfig)) and key in node.keys()  # noqa: SIM118


def _child(node: Any, key: Any, path: str) -> Any:
    """``node[key]`` resolved (plain containers are indexed as they are)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node[key]
    where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
    try:
        return node[key]
    except MissingMandatoryValue as err:
        raise PrecisionConfigError(
            f"{where} is '???' (a value the config leaves to be filled in), and it is read here: "
            f"set it in the config, or on the command line as {where}=<value>."
        ) from err
    except OmegaConfBaseException as err:
        reason = " ".join(line.strip() for line in str(err).splitlines()[:1])
        raise PrecisionConfigError(
            f"{where} cannot be resolved ({reason}), and it is read here: write the value itself, or "
            "for a custom resolver, register it before the config is read (OmegaConf.register_new_resolver)."
        ) from err
