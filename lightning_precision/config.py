"""Turn a YAML/OmegaConf trainer config into ``pl.Trainer`` keyword arguments, with the precision made safe.

Typical use::

    kwargs = resolve_trainer_cfg(cfg.trainer, model=cfg.model, optimizer=cfg.optimizer)
    model = MyModel.from_config(cfg.model, torch_dtype=kwargs.storage_dtype)
    trainer = pl.Trainer(**kwargs)

The library's own options live under the trainer key ``lightning_precision`` (never seen by Lightning)::

    trainer:
      precision: bf16-true
      lightning_precision:
        on_unsafe: error          # warn | error | ignore
        peft: false
        preserve_keys: [audio]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig

from lightning_precision._logging import warn_once
from lightning_precision.audio_presets import get_audio_preset, refused_under_autocast
from lightning_precision.callbacks.guard import PrecisionGuard
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS, normalize_preserve_keys
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.checkpoint_io import AtomicCheckpointIO
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
from lightning_precision.config_frameworks import nemo_precision_plugin
from lightning_precision.config_layouts import find_optimizer, find_torch_dtype
from lightning_precision.config_resolve import model_read_part, resolve_value
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode, is_lightning_only
from lightning_precision.pairing import Verdict, judge
from lightning_precision.plugins.flash import FlashPrecision
from lightning_precision.plugins.half_audio import HalfPrecisionForAudio
from lightning_precision.policy import (
    DEFAULT_ON_UNSAFE,
    OnUnsafe,
    PolicyHolder,
    agreed_policy,
    enforce,
    explicit_policies,
    optional_on_unsafe,
)
from lightning_precision.storage import StorageDecision, decide_storage
from lightning_precision.strategies.fsdp2 import FSDP2Strategy
from lightning_precision.strategies.fsdp2_plan import (
    FSDP2Precision,
    agreed_optimizer,
    resolve_fsdp2_precision,
    storage_option,
)
from lightning_precision.upstream import LIGHTNING_FSDP_MIXED_INIT, affected
from lightning_precision.values import parse_bool

OPTIONS_KEY = "lightning_precision"
_OPTIONS = {"on_unsafe": None, "peft": False, "preserve_keys": list(DEFAULT_PRESERVE_KEYS), "audio_preset": None}
_PLUGIN_FOR_FAMILY = {"true": HalfPrecisionForAudio, "flash": FlashPrecision}


class TrainerKwargs(dict):
    """Keyword arguments for ``pl.Trainer(**kwargs)`` (a plain ``dict``) that also carry what was resolved.

    Attributes:
        storage_dtype: Dtype to load/create the trainable parameters in (``None``: left to the model, e.g. PEFT or
            no model/optimizer section given). Pass it as ``torch_dtype`` when building the model.
        storage: The :class:`~lightning_precision.storage.StorageDecision` behind ``storage_dtype`` (``None`` when
            no model/optimizer section was given).
        precision_mode: The precision in effect, or ``None`` if the config sets none (Lightning's default).
        verdict: The pairing rule's judgement of the config, or ``None`` if it could not be judged from the config.
        on_unsafe: The policy in effect.
        sharded: What a storage-deciding strategy (``FSDP2Strategy``) resolved: storage, compute and reduce dtypes
            and its ``MixedPrecisionPolicy``; ``None`` for other strategies.
        optimizer: The optimizer that was judged, as the catalogue took it (a section found in the model section
            or written as ``class_path``/NeMo ``name`` is rewritten as a ``_target_`` config); ``None`` without one.
        optimizer_path: Where it was found (``"optimizer"``, ``"model.optim"``, ``"model.init_args.optimizer"``, ...).
        layout_notes: How the optimizer was read, when that is not obvious (a NeMo name mapped to a class).
    """

    storage_dtype: torch.dtype | None = None
    storage: StorageDecision | None = None
    precision_mode: PrecisionMode | None = None
    verdict: Verdict | None = None
    on_unsafe: OnUnsafe = "warn"
    upstream_faults: tuple[str, ...] = ()
    sharded: Any = None
    optimizer: Any = None
    optimizer_path: str | None = None
    layout_notes: tuple[str, ...] = ()


def resolve_trainer_cfg(
    trainer_cfg: Mapping[str, Any] | DictConfig,
    *,
    model: Mapping[str, Any] | DictConfig | None = None,
    optimizer: Any = None,
    peft: bool | None = None,
    on_unsafe: OnUnsafe | None = None,
) -> TrainerKwargs:
    """Resolve a trainer config into ``pl.Trainer`` kwargs, and act on the config's pairing under ``on_unsafe``.

    * Interpolations are resolved; the input is never modified.
    * ``precision``: true and flash strings are replaced by :class:`HalfPrecisionForAudio` /
      :class:`FlashPrecision`, *added* to ``plugins``; Lightning's own strings pass through.
    * ``_target_`` (Hydra) and ``class_path`` (LightningCLI) entries in ``plugins``, ``callbacks`` and ``strategy``
      are instantiated (each must name a class: ``os.system`` or a module is refused before anything is called);
      ``strategy: {name: <registered name>, ...options}`` builds a registered strategy.
    * The optimizer is found wherever NeMo, LightningCLI or this library's layout puts it (``optimizer``,
      ``model.optim``, ``model.optimizer``, ``model.init_args.optimizer``; see
      :mod:`~lightning_precision.config_layouts`), and the storage dtype in ``model.torch_dtype`` or
      ``model.init_args.torch_dtype``.
    * With ``model``/``optimizer`` sections, the storage dtype is decided once
      (:func:`~lightning_precision.storage.decide_storage`, or :class:`FSDP2Strategy`'s plan) and the config's
      pairing is judged, then acted on under ``on_unsafe`` (``bf16-true`` + ``torch.optim.AdamW`` is unsafe before
      anything runs). :func:`plan_trainer_cfg` does the same without acting.
    * A :class:`PrecisionGuard` callback is added unless one is there, to judge the real optimizers at fit start.
    * An :class:`~lightning_precision.checkpoint_io.AtomicCheckpointIO` is added to ``plugins`` unless a checkpoint IO
      plugin is there or the strategy object has its own: checkpoints are written next to their target and renamed.

    Args:
        trainer_cfg: The trainer section (dict or OmegaConf, struct mode too).
        model: The model section; its ``torch_dtype`` (unset/``auto``/a dtype) is read, and its optimizer section
            if it holds one (NeMo's ``optim``, ``optimizer``, LightningCLI's ``init_args.optimizer``).
        optimizer: The optimizer section (``_target_``/``class_path`` mapping), class, or import path.
        peft: Only adapters train (overrides ``lightning_precision.peft``).
        on_unsafe: Policy for an unsafe pairing (overrides ``lightning_precision.on_unsafe``).

    Returns:
        The kwargs, with ``storage_dtype``, ``storage``, ``precision_mode``, ``verdict`` and ``on_unsafe`` as
        attributes.

    Raises:
        PrecisionConfigError: On an unknown precision, a precision string given together with a precision plugin,
            two precision plugins, an unknown ``lightning_precision`` option, a dtype that is not a dtype, a
            ``_target_`` that does not import, two explicit ``on_unsafe`` policies that disagree, two optimizer
            sections (or two ``torch_dtype`` settings) that disagree, or a NeMo optimizer name NeMo does not know.
        PrecisionPairingError: If the config is an unsafe pairing under ``on_unsafe="error"``.
    """
    kwargs = plan_trainer_cfg(trainer_cfg, model=model, optimizer=optimizer, peft=peft, on_unsafe=on_unsafe)
    for fault in kwargs.upstream_faults:
        warn_once(f"upstream:{fault}", f"[config] {fault}")
    if kwargs.verdict is not None:
        enforce(kwargs.verdict, kwargs.on_unsafe, where="config")
    return kwargs


def plan_trainer_cfg(
    trainer_cfg: Mapping[str, Any] | DictConfig,
    *,
    model: Mapping[str, Any] | DictConfig | None = None,
    optimizer: Any = None,
    peft: bool | None = None,
    on_unsafe: OnUnsafe | None = None,
    build: bool = True,
) -> TrainerKwargs:
    """What :func:`resolve_trainer_cfg` resolves, judged but not acted on: nothing is warned or raised for the
    pairing (``kwargs.verdict`` says what it is). Takes the same arguments and raises the same config errors.

    With ``build=False`` nothing the config names is built or called (``explain`` reads untrusted files): plugins,
    callbacks and the strategy are :class:`~lightning_precision.config_classes.ClassSpec` objects (the class and its
    arguments), the plan is read from those, and the kwargs are a description, not ``pl.Trainer`` arguments."""
    cfg = _to_plain(trainer_cfg, what="trainer")
    raw_options = cfg.get(OPTIONS_KEY)
    plugin_only = [
        k for k in ("preserve_keys", "audio_preset") if isinstance(raw_options, Mapping) and k in raw_options
    ]
    options = _pop_options(cfg)
    policy_where = "resolve_trainer_cfg(on_unsafe=...)" if on_unsafe is not None else f"trainer.{OPTIONS_KEY}.on_unsafe"
    config_policy = optional_on_unsafe(
        on_unsafe if on_unsafe is not None else options["on_unsafe"], what=f"trainer.{OPTIONS_KEY}.on_unsafe"
    )
    peft = parse_bool(peft if peft is not None else options["peft"], what=f"trainer.{OPTIONS_KEY}.peft", spellings=True)
    preserve_keys = normalize_preserve_keys(options["preserve_keys"])
    audio_preset = get_audio_preset(options["audio_preset"], what=f"trainer.{OPTIONS_KEY}.audio_preset")

    entry = _instantiate if build else read_entry
    plugins = [  # NeMo 2's precision plugin is read without NeMo
        nemo_precision_plugin(p, f"trainer.plugins[{i}]", build=build) or entry(p, f"trainer.plugins[{i}]", "plugins")
        for i, p in enumerate(_as_list(cfg.pop("plugins", None), "trainer.plugins", strings=True))
    ]
    callbacks = [
        entry(c, f"trainer.callbacks[{i}]", "callbacks")
        for i, c in enumerate(_as_list(cfg.pop("callbacks", None), "trainer.callbacks"))
    ]
    if "strategy" in cfg:
        cfg["strategy"] = _build_strategy(cfg["strategy"], build)
    strategy = cfg.get("strategy")

    # One policy for the run: the config's, or one given explicitly to a plugin, callback or strategy.
    explicit = [(policy_where, config_policy)] if config_policy is not None else []
    policy = agreed_policy(explicit + _explicit_policies([*plugins, *callbacks, strategy])) or DEFAULT_ON_UNSAFE

    mode = _precision_mode(cfg, plugins)
    if mode is not None and "precision" in cfg and mode.family in _PLUGIN_FOR_FAMILY:
        del cfg["precision"]
        plugin_cls = _PLUGIN_FOR_FAMILY[mode.family]
        plugin_args = {"preserve_keys": preserve_keys, "on_unsafe": config_policy, "peft": peft}
        plugin_args |= {"audio_preset": audio_preset.name} if audio_preset else {}
        plugins.append(
            plugin_cls(mode.name, **plugin_args)
            if build
            else ClassSpec(plugin_cls, {"precision": mode.name, **plugin_args}, "trainer.precision")
        )
    elif plugin_only and mode is not None and mode.family in _PLUGIN_FOR_FAMILY:
        # A casting plugin object was given, so the option would be ignored and the kept keys cast.
        raise PrecisionConfigError(
            f"trainer.{OPTIONS_KEY}.{plugin_only[0]}={options[plugin_only[0]]!r} is only used by the precision plugin "
            f"built from trainer.precision, and a {mode.name} precision plugin was given instead: pass "
            f"{plugin_only[0]} to your precision plugin instead, or set trainer.precision and drop the plugin."
        )
    if audio_preset is not None and mode is not None and mode.autocast:
        raise PrecisionConfigError(refused_under_autocast(audio_preset, mode.name, f"trainer.{OPTIONS_KEY}"))
    if not _has_checkpoint_io(plugins, strategy):  # a user's own checkpoint IO (plugin or strategy's) is kept
        plugins.append(AtomicCheckpointIO() if build else ClassSpec(AtomicCheckpointIO, {}, "checkpoint_io"))
    if not any(is_a(c, PrecisionGuard) for c in callbacks):
        guard_args = {"on_unsafe": config_policy, "peft": peft}
        callbacks.append(PrecisionGuard(**guard_args) if build else ClassSpec(PrecisionGuard, guard_args, "guard"))

    kwargs = TrainerKwargs(cfg)
    if plugins:
        kwargs["plugins"] = plugins
    kwargs["callbacks"] = callbacks
    kwargs.precision_mode, kwargs.on_unsafe = mode, policy

    model_cfg = model_read_part(model)  # only what is read: NeMo's ??? and app-only resolvers elsewhere stay
    found = find_optimizer(
        model_cfg, _to_plain(optimizer, what="optimizer") if isinstance(optimizer, (Mapping, DictConfig)) else optimizer
    )
    optimizer_cfg = found.value if found is not None else None
    if found is not None:
        check_optimizer_target(optimizer_cfg, found.path)
        kwargs.optimizer, kwargs.optimizer_path = optimizer_cfg, found.path
        kwargs.layout_notes = (found.note,) if found.note else ()
    info = classify_optimizer(optimizer_cfg) if optimizer_cfg is not None else None
    dtype_found = find_torch_dtype(model_cfg)
    torch_dtype = dtype_found.value if dtype_found is not None else None
    if isinstance(strategy, ClassSpec) and issubclass(strategy.cls, FSDP2Strategy):
        kwargs.sharded = _plan_fsdp2_spec(
            strategy, mode or get_mode("32-true"), optimizer=optimizer_cfg, model_torch_dtype=torch_dtype, peft=peft
        )
        kwargs.storage = kwargs.sharded.storage
    elif isinstance(strategy, FSDP2Strategy):
        # The strategy decides the resident dtype; it learns what only the config knows before the optimizer exists
        # (a conflict with its own options is an error), and its plan is the decision judged here.
        strategy.learn_config(
            optimizer=optimizer_cfg, model_torch_dtype=torch_dtype, peft=peft, on_unsafe=config_policy
        )
        kwargs.sharded = strategy.plan(mode or get_mode("32-true"))
        kwargs.storage = kwargs.sharded.storage
    elif model_cfg is not None or optimizer_cfg is not None:
        kwargs.storage = decide_storage(
            explicit=torch_dtype,
            explicit_what=dtype_found.path if dtype_found is not None else "model.torch_dtype",
            precision=mode,
            optimizer=info,
            peft=peft,
        )
    if kwargs.storage is not None:
        kwargs.storage_dtype = kwargs.storage.dtype
    if info is not None:
        was_auto = kwargs.storage.was_auto if kwargs.storage is not None else True
        kwargs.verdict = judge(kwargs.storage_dtype, info, peft=peft, storage_was_auto=was_auto, precision=mode)
    kwargs.upstream_faults = _upstream_faults(strategy, mode)
    return kwargs


def _has_checkpoint_io(plugins: list[Any], strategy: Any) -> bool:
    """Whether the config gives a checkpoint IO plugin of its own, in ``plugins`` or to a strategy object."""
    if any(is_a(p, CheckpointIO) for p in plugins):
        return True
    if isinstance(strategy, ClassSpec):
        return strategy.arg("checkpoint_io") is not None
    return getattr(strategy, "_checkpoint_io", None) is not None  # a Strategy object; None for a name


def _upstream_faults(strategy: Any, mode: PrecisionMode | None) -> tuple[str, ...]:
    """Known faults of the installed Lightning that this config would meet (see :mod:`lightning_precision.upstream`)."""
    if isinstance(strategy, str):
        strategy = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    cls = class_of(strategy) if strategy is not None and not isinstance(strategy, type) else strategy
    lightning_fsdp = isinstance(cls, type) and issubclass(cls, LightningFSDPStrategy)
    if lightning_fsdp and mode is not None and mode.autocast and mode.half_dtype is not None:
        found = affected(LIGHTNING_FSDP_MIXED_INIT)
        return (found,) if found else ()
    return ()


def _precision_mode(cfg: dict[str, Any], plugins: list[Any]) -> PrecisionMode | None:
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


def _to_plain(cfg: Any, *, what: str) -> dict[str, Any]:
    if cfg is None:
        raise PrecisionConfigError(f"The {what} section is missing (got None); pass the mapping under '{what}:'.")
    if isinstance(cfg, (DictConfig, Mapping)):
        return resolve_value(cfg, path=what)  # a fresh container: the input stays untouched
    raise PrecisionConfigError(f"The {what} section must be a mapping, got {type(cfg).__name__}: {cfg!r}.")


def _pop_options(cfg: dict[str, Any]) -> dict[str, Any]:
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


def _as_list(value: Any, where: str, *, strings: bool = False) -> list[Any]:
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


def _instantiate(entry: Any, where: str, kind: str) -> Any:
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


def _build_strategy(entry: Any, build: bool) -> Any:
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
    return (_instantiate if build else read_entry)(entry, "trainer.strategy", "strategy")


def _explicit_policies(components: list[Any]) -> list[tuple[str, OnUnsafe]]:
    """``(where, policy)`` for each component given an explicit ``on_unsafe``: built ones say it themselves, a
    :class:`ClassSpec` of a policy-holding class by its ``on_unsafe`` argument."""
    found = explicit_policies([c for c in components if not isinstance(c, ClassSpec)])
    for spec in components:
        if isinstance(spec, ClassSpec) and issubclass(spec.cls, PolicyHolder):
            given = optional_on_unsafe(spec.init_args.get("on_unsafe"), what=f"{spec.where}.on_unsafe")
            if given is not None:
                found.append((f"{spec.cls.__name__}(on_unsafe=...)", given))
    return found


def _plan_fsdp2_spec(
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
