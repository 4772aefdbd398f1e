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
from omegaconf import DictConfig

from lightning_precision._logging import info_once, warn_once
from lightning_precision.audio_presets import get_audio_preset, refused_under_autocast
from lightning_precision.callbacks.guard import PrecisionGuard
from lightning_precision.casting import normalize_preserve_keys
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.checkpoint_io import AtomicCheckpointIO
from lightning_precision.config_classes import (
    ClassSpec,
    check_optimizer_target,
    is_a,
    read_entry,
)
from lightning_precision.config_entries import (
    OPTIONS_KEY,
    as_list,
    build_strategy,
    check_trainer_values,
    explicit_component_policies,
    has_checkpoint_io,
    instantiate,
    keeps_trainable_fp32,
    plan_fsdp2_spec,
    pop_options,
    precision_mode,
    to_plain,
    upstream_faults,
)
from lightning_precision.config_frameworks import nemo_precision_plugin
from lightning_precision.config_layouts import find_optimizer, find_torch_dtype
from lightning_precision.config_resolve import model_read_part
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.pairing import Verdict, judge
from lightning_precision.plugins.flash import FlashPrecision
from lightning_precision.plugins.half_audio import HalfPrecisionForAudio
from lightning_precision.policy import (
    DEFAULT_ON_UNSAFE,
    OnUnsafe,
    agreed_policy,
    enforce,
    optional_on_unsafe,
)
from lightning_precision.storage import StorageDecision, decide_storage
from lightning_precision.strategies.fsdp2 import FSDP2Strategy
from lightning_precision.values import parse_bool

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
    cfg = to_plain(trainer_cfg, what="trainer")
    raw_options = cfg.get(OPTIONS_KEY)
    plugin_only = [
        k for k in ("preserve_keys", "audio_preset") if isinstance(raw_options, Mapping) and k in raw_options
    ]
    options = pop_options(cfg)
    policy_where = "resolve_trainer_cfg(on_unsafe=...)" if on_unsafe is not None else f"trainer.{OPTIONS_KEY}.on_unsafe"
    config_policy = optional_on_unsafe(
        on_unsafe if on_unsafe is not None else options["on_unsafe"], what=f"trainer.{OPTIONS_KEY}.on_unsafe"
    )
    peft = parse_bool(peft if peft is not None else options["peft"], what=f"trainer.{OPTIONS_KEY}.peft", spellings=True)
    preserve_keys = normalize_preserve_keys(options["preserve_keys"])
    audio_preset = get_audio_preset(options["audio_preset"], what=f"trainer.{OPTIONS_KEY}.audio_preset")

    entry = instantiate if build else read_entry
    plugins = [  # NeMo 2's precision plugin is read without NeMo
        nemo_precision_plugin(p, f"trainer.plugins[{i}]", build=build) or entry(p, f"trainer.plugins[{i}]", "plugins")
        for i, p in enumerate(as_list(cfg.pop("plugins", None), "trainer.plugins", strings=True))
    ]
    callbacks = [
        entry(c, f"trainer.callbacks[{i}]", "callbacks")
        for i, c in enumerate(as_list(cfg.pop("callbacks", None), "trainer.callbacks"))
    ]
    if "strategy" in cfg:
        cfg["strategy"] = build_strategy(cfg["strategy"], build)
    strategy = cfg.get("strategy")

    # One policy for the run: the config's, or one given explicitly to a plugin, callback or strategy.
    explicit = [(policy_where, config_policy)] if config_policy is not None else []
    policy = (
        agreed_policy(explicit + explicit_component_policies([*plugins, *callbacks, strategy])) or DEFAULT_ON_UNSAFE
    )

    mode = precision_mode(cfg, plugins)
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
    if "preserve_keys" in plugin_only and mode is not None and mode.autocast:
        info_once(  # said, not silently dropped: autocast casts no input, and computes the first layer in half
            f"preserve_keys-under-{mode.name}",
            f"trainer.{OPTIONS_KEY}.preserve_keys has no effect under precision={mode.name!r}: autocast leaves every "
            "input in its dtype and computes in half precision; the option is for the '*-true' and '*-flash' plugins.",
        )
    if not has_checkpoint_io(plugins, strategy):  # a user's own checkpoint IO (plugin or strategy's) is kept
        plugins.append(AtomicCheckpointIO() if build else ClassSpec(AtomicCheckpointIO, {}, "checkpoint_io"))
    if not any(is_a(c, PrecisionGuard) for c in callbacks):
        guard_args = {"on_unsafe": config_policy, "peft": peft}
        callbacks.append(PrecisionGuard(**guard_args) if build else ClassSpec(PrecisionGuard, guard_args, "guard"))

    check_trainer_values(cfg)  # Lightning's own keys, as pl.Trainer types them ("false" is false)
    kwargs = TrainerKwargs(cfg)
    if plugins:
        kwargs["plugins"] = plugins
    kwargs["callbacks"] = callbacks
    kwargs.precision_mode, kwargs.on_unsafe = mode, policy

    model_cfg = model_read_part(model)  # only what is read: NeMo's ??? and app-only resolvers elsewhere stay
    found = find_optimizer(
        model_cfg, to_plain(optimizer, what="optimizer") if isinstance(optimizer, (Mapping, DictConfig)) else optimizer
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
        kwargs.sharded = plan_fsdp2_spec(
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
        # HalfPrecisionForAudio keeps PEFT adapters fp32 while casting the base: they are judged live at fit start.
        judged = None if peft and keeps_trainable_fp32(plugins) else kwargs.storage_dtype
        kwargs.verdict = judge(judged, info, peft=peft, storage_was_auto=was_auto, precision=mode)
    kwargs.upstream_faults = upstream_faults(strategy, mode)
    return kwargs
