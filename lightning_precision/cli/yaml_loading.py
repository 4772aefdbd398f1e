"""Loading a run's YAML config with ``key=value`` overrides, for the command line.

A run config has these sections (all but ``trainer`` optional)::

    trainer:    # pl.Trainer arguments, plus the library's options under `lightning_precision:`
    model:      # torch_dtype (auto | a dtype) and the built-in task's model arguments
    optimizer:  # _target_ and its keyword arguments
    data:       # the built-in task's data arguments
    seed: 0
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_precision.errors import PrecisionConfigError

SECTIONS = ("trainer", "model", "optimizer", "data", "seed")
_MISSING = object()


class ConfigInputError(PrecisionConfigError):
    """The config file or an override cannot be used as given (missing, unparsable, unknown key)."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run config and apply dotlist overrides.

    Args:
        path: The YAML file.
        overrides: ``key=value`` items (``trainer.max_steps=10``). A key must exist in the file, so a typo fails
            loudly instead of being ignored; prefix it with ``+`` to add a new key (``+trainer.log_every_n_steps=1``).

    Returns:
        The config (not in struct mode).

    Raises:
        ConfigInputError: If the file is missing or not a YAML mapping, an override is not ``key=value``, names an
            unknown key, or its value does not parse.
    """
    cfg = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(cfg, item)
    unknown = sorted(str(k) for k in cfg if k not in SECTIONS)
    if unknown:
        raise ConfigInputError(
            f"{path}: unknown top-level section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}."
        )
    if not isinstance(cfg.get("trainer"), DictConfig):
        raise ConfigInputError(f"{path}: needs a 'trainer:' mapping (pl.Trainer arguments).")
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigInputError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigInputError(f"{path}: not valid YAML: {_one_line(err)}") from err
    except OmegaConfBaseException as err:
        raise ConfigInputError(f"{path}: cannot be loaded: {_one_line(err)}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigInputError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)}).")
    return cfg


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, sep, value = item.partition("=")
    add = key.startswith("+")
    key = key.removeprefix("+").strip()
    if not sep or not key:
        raise ConfigInputError(f"override {item!r} is not key=value (e.g. trainer.max_steps=10).")
    if not add and OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is _MISSING:
        raise ConfigInputError(
            f"override {item!r}: unknown key {key!r} (not in the config; use '+{key}={value}' to add it)."
        )
    try:
        # OmegaConf's own grammar parses the value, so 1e-3, null, [1, 2] and {a: 1} mean what they do in YAML.
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        OmegaConf.update(cfg, key, OmegaConf.select(parsed, key), force_add=True)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise ConfigInputError(f"override {item!r}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def section(cfg: DictConfig, name: str) -> dict[str, Any] | None:
    """A section as a plain dict with interpolations resolved, or ``None`` if absent."""
    value = cfg.get(name)
    if value is None:
        return None
    try:
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    except OmegaConfBaseException as err:
        raise ConfigInputError(f"section {name!r}: {_one_line(err)}") from err
    if not isinstance(plain, dict):
        raise ConfigInputError(f"section {name!r} must be a mapping, got {plain!r}.")
    return plain
