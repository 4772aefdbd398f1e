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
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from lightning_precision._imports import import_object
from lightning_precision.callbacks.guard import PrecisionGuard
from lightning_precision.casting import DEFAULT_PRESERVE_KEYS, normalize_preserve_keys
from lightning_precision.dtypes import parse_bool, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode, is_lightning_only
from lightning_precision.pairing import (
    OnUnsafe,
    Verdict,
    classify_optimizer,
    enforce,
    judge,
    resolve_storage_dtype,
    validate_on_unsafe,
)
from lightning_precision.plugins.flash import FlashPrecision
from lightning_precision.plugins.half_audio import HalfPrecisionForAudio

OPTIONS_KEY = "lightning_precision"
_OPTIONS = {"on_unsafe": "warn", "peft": False, "preserve_keys": list(DEFAULT_PRESERVE_KEYS)}
_PLUGIN_FOR_FAMILY = {"true": HalfPrecisionForAudio, "flash": FlashPrecision}


class TrainerKwargs(dict):
    """Keyword arguments for ``pl.Trainer(**kwargs)`` (a plain ``dict``) that also carry what was resolved.

    Attributes:
        storage_dtype: Dtype to load/create the trainable parameters in (``None``: left to the model, e.g. PEFT or
            no model/optimizer section given). Pass it as ``torch_dtype`` when building the model.
        precision_mode: The precision in effect, or ``None`` if the config sets none (Lightning's default).
        verdict: The pairing rule's judgement of the config, or ``None`` if it could not be judged from the config.
        on_unsafe: The policy in effect.
        sharded: What a storage-deciding strategy (``FSDP2Strategy``) resolved: storage, compute and reduce dtypes
            and its ``MixedPrecisionPolicy``; ``None`` for other strategies.
    """

    storage_dtype: torch.dtype | None = None
    precision_mode: PrecisionMode | None = None
    verdict: Verdict | None = None
    on_unsafe: OnUnsafe = "warn"
    sharded: Any = None


def resolve_trainer_cfg(
    trainer_cfg: Mapping[str, Any] | DictConfig,
    *,
    model: Mapping[str, Any] | DictConfig | None = None,
    optimizer: Any = None,
    peft: bool | None = None,
    on_unsafe: OnUnsafe | None = None,
) -> TrainerKwargs:
    """Resolve a trainer config into ``pl.Trainer`` kwargs.

    * Interpolations are resolved; the input is never modified.
    * ``precision``: true and flash strings are replaced by :class:`HalfPrecisionForAudio` /
      :class:`FlashPrecision`, *added* to ``plugins``; Lightning's own strings pass through.
    * ``_target_`` (Hydra) and ``class_path`` (LightningCLI) entries in ``plugins``, ``callbacks`` and ``strategy``
      are instantiated; ``strategy: {name: <registered name>, ...options}`` builds a registered strategy.
    * With ``model``/``optimizer`` sections, the storage dtype is resolved by the pairing rule and the config's
      pairing is judged under ``on_unsafe`` (``bf16-true`` + ``torch.optim.AdamW`` is unsafe before anything runs).
    * A :class:`PrecisionGuard` callback is added unless one is there, to judge the real optimizers at fit start.

    Args:
        trainer_cfg: The trainer section (dict or OmegaConf, struct mode too).
        model: The model section; its ``torch_dtype`` (unset/``auto``/a dtype) is read.
        optimizer: The optimizer section (``_target_``/``class_path`` mapping), class, or import path.
        peft: Only adapters train (overrides ``lightning_precision.peft``).
        on_unsafe: Policy for an unsafe pairing (overrides ``lightning_precision.on_unsafe``).

    Returns:
        The kwargs, with ``storage_dtype``, ``precision_mode``, ``verdict`` and ``on_unsafe`` as attributes.

    Raises:
        PrecisionConfigError: On an unknown precision, a precision string given together with a precision plugin,
            two precision plugins, an unknown ``lightning_precision`` option, a dtype that is not a dtype, or a
            ``_target_`` that does not import.
        PrecisionPairingError: If the config is an unsafe pairing under ``on_unsafe="error"``.
    """
    cfg = _to_plain(trainer_cfg, what="trainer")
    options = _pop_options(cfg)
    on_unsafe = validate_on_unsafe(on_unsafe if on_unsafe is not None else options["on_unsafe"])
    peft = parse_bool(peft if peft is not None else options["peft"], what=f"trainer.{OPTIONS_KEY}.peft")
    preserve_keys = normalize_preserve_keys(options["preserve_keys"])

    plugins = [_instantiate(p, f"trainer.plugins[{i}]") for i, p in enumerate(_as_list(cfg.pop("plugins", None)))]
    callbacks = [_instantiate(c, f"trainer.callbacks[{i}]") for i, c in enumerate(_as_list(cfg.pop("callbacks", None)))]
    if "strategy" in cfg:
        cfg["strategy"] = _build_strategy(cfg["strategy"])

    precision_plugins = [p for p in plugins if isinstance(p, Precision)]
    if len(precision_plugins) > 1:
        raise PrecisionConfigError(
            f"trainer.plugins has {len(precision_plugins)} precision plugins "
            f"({', '.join(type(p).__name__ for p in precision_plugins)}); give exactly one."
        )
    mode = None
    if is_lightning_only(cfg.get("precision")):
        pass  # e.g. "transformer-engine": Lightning builds its own plugin; the guard still judges the live optimizers
    elif cfg.get("precision") is not None:
        mode = get_mode(cfg["precision"], what="trainer.precision")
        if precision_plugins:
            raise PrecisionConfigError(
                f"trainer.precision={cfg['precision']!r} and the precision plugin "
                f"{type(precision_plugins[0]).__name__} in trainer.plugins both set the precision; give one of them."
            )
        if mode.family in _PLUGIN_FOR_FAMILY:
            del cfg["precision"]
            plugin_cls = _PLUGIN_FOR_FAMILY[mode.family]
            plugins.append(plugin_cls(mode.name, preserve_keys=preserve_keys, on_unsafe=on_unsafe, peft=peft))
    elif precision_plugins and getattr(precision_plugins[0], "precision", None):
        try:
            mode = get_mode(precision_plugins[0].precision)
        except PrecisionConfigError:  # a plugin for a precision this library does not model
            mode = None

    if not any(isinstance(c, PrecisionGuard) for c in callbacks):
        callbacks.append(PrecisionGuard(on_unsafe=on_unsafe, peft=peft))

    kwargs = TrainerKwargs(cfg)
    if plugins:
        kwargs["plugins"] = plugins
    kwargs["callbacks"] = callbacks
    kwargs.precision_mode, kwargs.on_unsafe = mode, on_unsafe

    model_cfg = _to_plain(model, what="model") if model is not None else None
    optimizer_cfg = (
        _to_plain(optimizer, what="optimizer") if isinstance(optimizer, (Mapping, DictConfig)) else optimizer
    )
    explicit = parse_dtype((model_cfg or {}).get("torch_dtype"), what="model.torch_dtype")
    storage_was_auto = explicit is None and (mode is None or mode.storage_dtype is None)
    if model_cfg is not None or optimizer_cfg is not None:
        kwargs.storage_dtype = resolve_storage_dtype(model_cfg, optimizer_cfg, peft=peft, precision=mode)
    strategy = kwargs.get("strategy")
    if hasattr(strategy, "apply_resolved_config"):
        # A strategy that decides storage itself (FSDP2Strategy) learns the optimizer before it exists, and its
        # decision is the one judged: it may have its own explicit storage_dtype.
        kwargs.sharded = strategy.apply_resolved_config(kwargs, optimizer=optimizer_cfg, peft=peft, model=model_cfg)
        kwargs.storage_dtype = kwargs.sharded.storage_dtype
        storage_was_auto = kwargs.sharded.storage_was_auto
    if optimizer_cfg is not None:
        verdict = judge(
            kwargs.storage_dtype, classify_optimizer(optimizer_cfg), peft=peft, storage_was_auto=storage_was_auto
        )
        kwargs.verdict = enforce(verdict, on_unsafe, where="config")
    return kwargs


def _to_plain(cfg: Any, *, what: str) -> dict[str, Any]:
    if cfg is None:
        raise PrecisionConfigError(f"The {what} section is missing (got None); pass the mapping under '{what}:'.")
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # a fresh container: the input stays untouched
    if isinstance(cfg, Mapping):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}
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


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]  # a single plugin or callback, as Lightning also accepts


def _instantiate(entry: Any, where: str) -> Any:
    """Build a ``_target_`` or ``class_path`` mapping; anything else is returned as is."""
    if not isinstance(entry, Mapping):
        return entry
    if "_target_" in entry:
        import_object(str(entry["_target_"]), where=where)  # a clear error names the entry before Hydra's own message
        from hydra.utils import instantiate

        return instantiate(dict(entry), _convert_="all")
    if "class_path" in entry:
        cls = import_object(str(entry["class_path"]), where=where)
        return cls(**dict(entry.get("init_args") or {}))
    raise PrecisionConfigError(f"{where}: a mapping needs '_target_' or 'class_path' to be built, got {dict(entry)!r}.")


def _build_strategy(entry: Any) -> Any:
    if isinstance(entry, str) and entry in StrategyRegistry:
        data = StrategyRegistry[entry]
        if hasattr(data["strategy"], "apply_resolved_config"):
            # Built here rather than by Lightning so it can learn the optimizer section (e.g. "fsdp2").
            return data["strategy"](**data["init_params"])
    if isinstance(entry, Mapping) and "name" in entry and "_target_" not in entry and "class_path" not in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        name = entry["name"]
        if name not in StrategyRegistry:
            raise PrecisionConfigError(
                f"trainer.strategy.name={name!r} is not a registered strategy. Registered: "
                f"{', '.join(sorted(StrategyRegistry))}."
            )
        data = StrategyRegistry[name]
        return data["strategy"](**{**data["init_params"], **options})
    return _instantiate(entry, "trainer.strategy")
