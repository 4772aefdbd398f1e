"""Reading an optimizer from any spelling (instance, class, import path, Hydra or LightningCLI config) into one
:class:`OptimizerSpec`: its import path, its class where it imports here, and its settings. Judging what it keeps is
:mod:`lightning_precision.catalogue.families`'s job.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision._imports import import_object, require_class
from lightning_precision._logging import info_rank_zero
from lightning_precision.catalogue.info import UpdateFormula
from lightning_precision.config_classes import check_arguments
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import parse_bool, parse_number

_CONFIG_TARGET_KEYS = ("_target_", "class_path")
_ADAM_NAMES = ("adam", "lamb", "adan", "lion")  # optimizers with an EMA state; lion has only one moment


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as resolved from any spelling: its import path, class (if it imports here), settings, instance."""

    name: str
    cls: type | None
    settings: dict[str, Any]
    instance: Any

    @property
    def short(self) -> str:
        return self.name.lower().rsplit(".", 1)[-1]

    def declares(self, attr: str) -> bool:
        return bool(getattr(self.instance, attr, False) or getattr(self.cls, attr, False))

    def flag(self, key: str, *, default: bool = False) -> bool:
        """A boolean setting as a config writes it (``"false"`` is False, never truth-tested); ``None`` or absent:
        ``default``."""
        value = self.settings.get(key)
        return default if value is None else parse_bool(value, what=f"{self.name} {key}", spellings=True)

    def common(self) -> dict[str, Any]:
        """The fields every family fills the same way."""
        short = self.short
        is_adam = any(k in short for k in _ADAM_NAMES)
        if "lion" in short:
            moments: tuple[str, ...] = ("exp_avg",)
        elif is_adam:
            moments = ("exp_avg", "exp_avg_sq")
        else:
            moments = ("momentum_buffer",) if self.settings.get("momentum") else ()
        formula: UpdateFormula | None = "adam" if is_adam and "lion" not in short else None
        if (self.cls is not None and issubclass(self.cls, torch.optim.SGD)) or self.name.startswith("torch.optim.sgd"):
            formula = "sgd"
        return {
            "name": self.name,
            "is_adam": is_adam,
            "beta2": _beta2(self.name, self.settings),
            "moments": moments,
            "moment_dtypes": _moment_dtypes(self.name, self.settings, moments),
            "stochastic_moments": tuple(m for m in moments if self.settings.get(f"{m}_rounding") == "stochastic"),
            "update_formula": formula,
            "decoupled_weight_decay": short.endswith("adamw") or self.flag("decoupled_weight_decay"),
        }


def resolve_spec(optimizer: Any, kwargs: Mapping[str, Any] | None) -> OptimizerSpec:
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        settings = {**_signature_defaults(cls), **optimizer.defaults, **_instance_settings(optimizer)}
        return OptimizerSpec(qualname(cls), cls, settings, optimizer)
    if isinstance(optimizer, Mapping):
        target = next((optimizer[k] for k in _CONFIG_TARGET_KEYS if k in optimizer), None)
        if target is None:
            raise PrecisionConfigError(
                f"optimizer config {dict(optimizer)!r} names no optimizer: give '_target_' (Hydra) or 'class_path' "
                "(LightningCLI)."
            )
        cfg_kwargs = (
            dict(optimizer.get("init_args") or {})
            if "class_path" in optimizer
            else {k: v for k, v in optimizer.items() if not (isinstance(k, str) and k.startswith("_"))}
        )
        return resolve_spec(target, {**cfg_kwargs, **(kwargs or {})})
    if isinstance(optimizer, str):
        cls = _locate(optimizer)
        if cls is None:
            return OptimizerSpec(optimizer, None, dict(kwargs or {}), None)
        optimizer = cls
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        check_arguments(optimizer, dict(kwargs or {}), "optimizer")  # a misspelt keyword fails here, not at fit start
        return OptimizerSpec(
            qualname(optimizer), optimizer, {**_signature_defaults(optimizer), **dict(kwargs or {})}, None
        )
    raise PrecisionConfigError(
        f"Cannot classify optimizer {optimizer!r}: expected a torch.optim.Optimizer instance or class, an import path "
        "such as 'torch.optim.AdamW', or a config mapping with '_target_' or 'class_path'."
    )


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _locate(path: str) -> type | None:
    """The class at ``path``; ``None`` only when its top-level package is not installed here (e.g. Transformer
    Engine on a CPU machine), so such a config is still classified by its path.

    Raises:
        PrecisionConfigError: If the package is installed but the path does not name an object in it (a typo such
            as ``"torch.optim.AdamWW"``): judging a name that does not exist would invent what it does; or if it
            names something that is not a class (``"os.system"``, the ``"torch.optim"`` module).
    """
    top = str(path).split(".", 1)[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return None
    try:
        obj = import_object(path, where="optimizer")
    except PrecisionConfigError:
        raise
    except Exception as err:  # the package's own import code failed here (a CUDA-only package on a CPU machine)
        info_rank_zero(
            f"optimizer {path!r}: importing it raised {type(err).__name__}: {err}; it is judged by its path alone."
        )
        return None
    # A function, builtin or module is not an optimizer: calling it "unknown" would pass it on to be run.
    expected = "a torch.optim.Optimizer subclass such as 'torch.optim.AdamW'"
    return require_class(obj, path, where="optimizer", expected=expected)


def _signature_defaults(cls: type) -> dict[str, Any]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _instance_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Constructor options a live instance keeps outside ``defaults``.

    Many optimizers store keyword-only options as attributes (torchao's ``bf16_stochastic_round``, Transformer
    Engine's ``master_weights``), so an instance reads as its config would.
    """
    settings = {
        name: getattr(optimizer, name)
        for name in _signature_defaults(type(optimizer))
        if name not in optimizer.defaults and isinstance(getattr(optimizer, name, None), (bool, int, float, str))
    }
    groups = optimizer.param_groups
    if groups and "master_bytewidth" in groups[0]:  # flashoptim records it per group
        settings["master_bytewidth"] = max(g.get("master_bytewidth", 0) for g in groups)
    settings.update(_group_settings(optimizer))
    return settings


def _group_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The options the parameter groups really hold where they replace the constructor's ``defaults`` (a loaded state
    dict brings its own groups): a value all groups share; for a ``<moment>_rounding`` option the groups disagree on,
    ``"nearest"`` if any group rounds so (a stochastic moment is claimed only where every group has one)."""
    found: dict[str, Any] = {}
    for key in optimizer.defaults:
        values = [g[key] for g in optimizer.param_groups if key in g]
        if not values or not all(isinstance(v, (bool, int, float, str, tuple, type(None))) for v in values):
            continue
        if all(v == values[0] for v in values):
            found[key] = values[0]
        elif key.endswith("_rounding") and "nearest" in values:
            found[key] = "nearest"
    return found


def _beta2(name: str, s: Mapping[str, Any]) -> float | None:
    # Read as numbers in [0, 1), never with float(): `betas: [0.9, abc]` is refused naming `abc`. A live torch
    # optimizer may hold tensor betas (capturable): those are read as their value.
    betas = s.get("betas") if s.get("beta2") is None else {"beta2": s["beta2"]}
    if isinstance(betas, (list, tuple)) and len(betas) >= 2:
        betas = {f"betas[{i}]": beta for i, beta in enumerate(betas)}
    if not isinstance(betas, dict):
        return None
    betas = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in betas.items()}
    read = [parse_number(v, what=f"{name} {k}", low=0, high=1, high_open=True) for k, v in betas.items()]
    return read[-1] if read else None


def _moment_dtypes(name: str, s: Mapping[str, Any], moments: tuple[str, ...]) -> tuple[tuple[str, torch.dtype], ...]:
    """Moment dtypes fixed by ``<moment>_dtype`` options (``CompensatedAdamW(exp_avg_dtype=...)``)."""
    fixed = []
    for moment in moments:
        value = parse_dtype(s.get(f"{moment}_dtype"), what=f"{name} {moment}_dtype")
        if value is not None:
            fixed.append((moment, value))
    return tuple(fixed)
