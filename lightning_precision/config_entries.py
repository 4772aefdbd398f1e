"""Reading the entries of a trainer config: the library's options, the precision, plugins, callbacks and strategy,
and Lightning's own values typed by ``pl.Trainer``'s signature.

:func:`~lightning_precision.config.plan_trainer_cfg` asks these, in the order a run needs them.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig

from lightning_precision._plugin_common import TrueHalfMixin
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS
from lightning_precision.config_classes import (
    ClassSpec,
    check_arguments,
    check_nested_targets,
    check_optimizer_target,
    class_of,
    construct,
    is_a,
    option_of,
    read_entry,
)
from lightning_precision.config_resolve import resolve_value
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode, is_lightning_only
from lightning_precision.policy import OnUnsafe, PolicyHolder, explicit_policies, optional_on_unsafe
from lightning_precision.strategies.fsdp2 import FSDP2Strategy
from lightning_precision.strategies.fsdp2_plan import (
    FSDP2Precision,
    agreed_optimizer,
    resolve_fsdp2_precision,
    storage_option,
)
from lightning_precision.upstream import LIGHTNING_FSDP_MIXED_INIT, affected
from lightning_precision.values import parse_bool, parse_number

OPTIONS_KEY = "lightning_precision"
_OPTIONS = {"on_unsafe": None, "peft": False, "preserve_keys": list(DEFAULT_PRESERVE_KEYS), "audio_preset": None}


def check_trainer_values(trainer_args: dict[str, Any]) -> None:
    """Numbers and flags of ``pl.Trainer`` read with the library's parsers, as its signature types them.

    Lightning compares ``max_steps="abc"`` with an int deep inside and reports neither the key nor the value; a flag
    given as the string ``"false"`` would read as true. Flags take the config spellings and become real booleans
    (in place).

    Raises:
        PrecisionConfigError: Naming the key and the value that is not of its type.
    """
    try:
        hints = typing.get_type_hints(pl.Trainer.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve: leave the values to Lightning
        return
    for name, value in trainer_args.items():
        allowed = set(typing.get_args(hints.get(name)) or (hints.get(name),))
        if value is None and type(None) in allowed:
            continue
        allowed.discard(type(None))
        if allowed == {int}:
            parse_number(value, what=f"trainer.{name}", integer=True)
        elif allowed == {int, float}:
            parse_number(value, what=f"trainer.{name}")
        elif allowed == {bool}:
            trainer_args[name] = parse_bool(value, what=f"trainer.{name}", spellings=True)


def keeps_trainable_fp32(plugins: list[Any]) -> bool:
    """Whether the precision plugin keeps trainable parameters fp32 for adapter training (``HalfPrecisionForAudio``
    unless ``keep_trainable_fp32=False``; see :mod:`lightning_precision.trainable_fp32`)."""
    return any(is_a(p, TrueHalfMixin) and option_of(p, "keep_trainable_fp32") is not False for p in plugins)


def has_checkpoint_io(plugins: list[Any], strategy: Any) -> bool:
    """Whether the config gives a checkpoint IO plugin of its own, in ``plugins`` or to a strategy object."""
    if any(is_a(p, CheckpointIO) for p in plugins):
        return True
    if isinstance(strategy, ClassSpec):
        return strategy.arg("checkpoint_io") is not None
    return getattr(strategy, "_checkpoint_io", None) is not None  # a Strategy object; None for a name


def upstream_faults(strategy: Any, mode: PrecisionMode | None) -> tuple[str, ...]:
    """Known faults of the installed Lightning that this config would meet (see :mod:`lightning_precision.upstream`)."""
    if isinstance(strategy, str):
        strategy = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    cls = class_of(strategy) if strategy is not None and not isinstance(strategy, type) else strategy
    lightning_fsdp = isinstance(cls, type) and issubclass(cls, LightningFSDPStrategy)
    if lightning_fsdp and mode is not None and mode.autocast and mode.half_dtype is not None:
        found = affected(LIGHTNING_FSDP_MIXED_INIT)
        return (found,) if found else ()
    return ()


def precision_mode(cfg: dict[str, Any], plugins: list[Any]) -> PrecisionMode | None:
    """The precision the config sets, by string or by its one precision plugin; ``None`` if neither."""
    precision_plugins = [p for p in plugins if is_a(p, Precision)]
    if len(precision_plugins) > 1:
        raise PrecisionConfigError(
            f"trainer.plugins has {len(precision_plugins)} precision plugins "
            f"({', '.join(class_of(p).__name__ for p in precision_plugins)}); give exactly one."
        )
    if is_lightning_only(cfg.get("precision")):
        return None  # e.g. "transformer-engine": Lightning builds its own plugin; the guard judges the live optimizers
    if cfg.get("precision") is not None:
        mode = get_mode(cfg["precision"], what="trainer.precision")
        if precision_plugins:
            raise PrecisionConfigError(
                f"trainer.precision={cfg['precision']!r} and the precision plugin "
                f"{class_of(precision_plugins[0]).__name__} in trainer.plugins both set the precision; "
                "give one of them."
            )
        return mode
    # A plugin class's precision: its argument, its default, or a class attribute (DoublePrecision's "64-true").
    precision = precision_plugins and option_of(
        precision_plugins[0], "precision", getattr(class_of(precision_plugins[0]), "precision", None)
    )
    if precision and isinstance(precision, str):
        try:
            return get_mode(precision)
        except PrecisionConfigError:  # a plugin for a precision this library does not model
            return None
    return None


def to_plain(cfg: Any, *, what: str) -> dict[str, Any]:
    if cfg is None:
        raise PrecisionConfigError(f"The {what} section is missing (got None); pass the mapping under '{what}:'.")
    if isinstance(cfg, (DictConfig, Mapping)):
        return resolve_value(cfg, path=what)  # a fresh container: the input stays untouched
    raise PrecisionConfigError(f"The {what} section must be a mapping, got {type(cfg).__name__}: {cfg!r}.")


def pop_options(cfg: dict[str, Any]) -> dict[str, Any]:
    given = cfg.pop(OPTIONS_KEY, None) or {}
    if not isinstance(given, Mapping):
        raise PrecisionConfigError(
            f"trainer.{OPTIONS_KEY} must be a mapping with keys {sorted(_OPTIONS)}, got {given!r}."
        )
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        raise PrecisionConfigError(
            f"Unknown option(s) trainer.{OPTIONS_KEY}.{', '.join(map(str, unknown))}. Valid options: {sorted(_OPTIONS)}."
        )
    return {**_OPTIONS, **given}


def as_list(value: Any, where: str, *, strings: bool = False) -> list[Any]:
    """The entries of ``plugins``/``callbacks`` (one entry alone, as Lightning accepts); null or a number (or a string,
    unless ``strings``) is refused here, where Lightning would fail later on its missing hooks."""
    is_list = isinstance(value, (list, tuple))
    items = [] if value is None else list(value) if is_list else [value]
    for i, item in enumerate(items):
        if item is None or (isinstance(item, (str, int, float)) and not (strings and isinstance(item, str))):
            at = f"{where}[{i}]" if is_list else where
            shown = "null" if item is None else repr(item)
            raise PrecisionConfigError(
                f"{at} is {shown}: give a class_path/_target_ mapping or an object, or remove it."
            )
    return items


def instantiate(entry: Any, where: str, kind: str) -> Any:
    """Build a ``_target_`` or ``class_path`` mapping; anything else is returned as is.

    Everything it would build is checked first: a name that is not a class (``os.system``, ``print``, a module) is
    refused before anything is called.
    """
    if not isinstance(entry, Mapping):
        return entry
    spec = read_entry(entry, where, kind)  # checks the class and its arguments
    if "_target_" in entry:
        check_nested_targets(dict(entry), where, kind)
        from hydra.utils import instantiate

        build = {"config": dict(entry), "_convert_": "all"}
        return construct(instantiate, build, where=where, name=entry["_target_"], shown=spec.init_args)
    return construct(spec.cls, spec.init_args, where=where, name=entry["class_path"])


def build_strategy(entry: Any, build: bool) -> Any:
    """The strategy as the trainer gets it (``build``), or as a :class:`ClassSpec` that is never built."""
    if isinstance(entry, str) and entry in StrategyRegistry:
        data = StrategyRegistry[entry]
        if issubclass(data["strategy"], FSDP2Strategy):
            # Built here rather than by Lightning so it can learn the optimizer section (e.g. "fsdp2").
            spec = ClassSpec(data["strategy"], dict(data["init_params"]), "trainer.strategy")
            return construct(spec.cls, spec.init_args, where=spec.where, name=spec.cls.__name__) if build else spec
    if isinstance(entry, Mapping) and "name" in entry and "_target_" not in entry and "class_path" not in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        name = entry["name"]
        if name not in StrategyRegistry:
            raise PrecisionConfigError(
                f"trainer.strategy.name={name!r} is not a registered strategy. Registered: "
                f"{', '.join(sorted(StrategyRegistry))}."
            )
        data = StrategyRegistry[name]
        spec = ClassSpec(data["strategy"], {**data["init_params"], **options}, "trainer.strategy")
        check_arguments(spec.cls, options, "trainer.strategy")
        return construct(spec.cls, spec.init_args, where=spec.where, name=spec.cls.__name__) if build else spec
    return (instantiate if build else read_entry)(entry, "trainer.strategy", "strategy")


def explicit_component_policies(components: list[Any]) -> list[tuple[str, OnUnsafe]]:
    """``(where, policy)`` for each component given an explicit ``on_unsafe``: built ones say it themselves, a
    :class:`ClassSpec` of a policy-holding class by its ``on_unsafe`` argument."""
    found = explicit_policies([c for c in components if not isinstance(c, ClassSpec)])
    for spec in components:
        if isinstance(spec, ClassSpec) and issubclass(spec.cls, PolicyHolder):
            given = optional_on_unsafe(spec.init_args.get("on_unsafe"), what=f"{spec.where}.on_unsafe")
            if given is not None:
                found.append((f"{spec.cls.__name__}(on_unsafe=...)", given))
    return found


def plan_fsdp2_spec(
    spec: ClassSpec, mode: PrecisionMode, *, optimizer: Any, model_torch_dtype: Any, peft: bool
) -> FSDP2Precision:
    """What an :class:`FSDP2Strategy` built from ``spec`` would plan after ``learn_config``, read from its arguments.

    The same rules as ``FSDP2Strategy.learn_config`` and ``plan`` (:func:`storage_option`,
    :func:`agreed_optimizer`), with ``peft`` on either side counting.
    """
    hint = spec.arg("optimizer")
    check_optimizer_target(hint, f"{spec.where}.optimizer")
    model_dtype = parse_dtype(model_torch_dtype, what="model.torch_dtype")
    storage = storage_option(spec.arg("storage_dtype", "auto"), model_dtype)
    own_peft = parse_bool(spec.arg("peft", False), what=f"{spec.cls.__name__}(peft=...)", spellings=True)
    return resolve_fsdp2_precision(
        mode,
        storage_dtype=storage,
        mp_policy=spec.arg("mp_policy"),
        optimizer=agreed_optimizer(hint, optimizer),
        peft=own_peft or peft,
    )
