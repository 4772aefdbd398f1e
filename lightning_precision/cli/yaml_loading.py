"""Loading a run's YAML config with ``key=value`` overrides, for the command line.

A run config has these sections (all but ``trainer`` optional)::

    trainer:    # pl.Trainer arguments, plus the library's options under `lightning_precision:`
    model:      # torch_dtype (auto | a dtype) and the built-in task's model arguments
    optimizer:  # _target_ and its keyword arguments
    data:       # the built-in task's data arguments
    seed: 0

NeMo, LightningCLI and composed Hydra configs are read too (:mod:`lightning_precision.config_layouts`): the
optimizer may sit in the model section, and other top-level sections are ignored with a note.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_precision.config_frameworks import LITGPT_KEYS
from lightning_precision.config_layouts import RUN_SECTIONS, RunLayout, read_run_layout
from lightning_precision.config_resolve import model_read_part, resolve_value
from lightning_precision.errors import PrecisionConfigError

_MISSING = object()
# Top-level sections read whole (the model section is read in part); LitGPT's keys sit at the top level.
_READ_WHOLE = ("trainer", "optimizer", *LITGPT_KEYS)


class ConfigInputError(PrecisionConfigError):
    """The config file or an override cannot be used as given (missing, unparsable, unknown key)."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run config and apply dotlist overrides.

    Args:
        path: The YAML file.
        overrides: ``key=value`` items (``trainer.max_steps=10``). A key must exist in the file, so a typo fails
            loudly instead of being ignored; prefix it with ``+`` to add a new key (``+trainer.log_every_n_steps=1``).

    Returns:
        The config (not in struct mode), with a ``trainer`` mapping.

    Raises:
        PrecisionConfigError: (:class:`ConfigInputError` for the file) If the file is missing or not a YAML
            mapping, an override is not ``key=value``, names an unknown key, or its value does not parse, or the
            config has no ``trainer`` mapping.
    """
    cfg = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(cfg, item)
    load_layout(cfg, source=str(path), log_notes=False)  # the layout's own checks, before anyone reads a section
    return cfg


def load_layout(cfg: DictConfig, *, source: str, log_notes: bool = True) -> RunLayout:
    """The sections of a loaded config that the library reads, with notes on the ones it ignores.

    Args:
        cfg: The loaded config.
        source: The file name, for messages.
        log_notes: Also log each note (once per run: the commands ask for it, :func:`load_config` does not).

    Raises:
        PrecisionConfigError: See :func:`~lightning_precision.config_layouts.read_run_layout`.
    """
    # Only what is read is resolved: an ignored section may interpolate what exists only inside its app (NeMo's
    # exp_manager with ${hydra:runtime.output_dir}), and NeMo's model section holds ??? and app-only resolvers.
    plain: dict[str, Any] = {}
    for key in cfg:
        name = str(key)
        if name == "model":
            plain[name] = model_read_part(_node(cfg, name))
        else:
            plain[name] = _resolved(cfg, name) if name in _READ_WHOLE else None
    return read_run_layout(plain, source=source, log_notes=log_notes)


def require_trainer_section(layout: RunLayout, *, source: str) -> RunLayout:
    """For a command that builds a Trainer from the file (``train``): refuse a layout read without a trainer section.

    Raises:
        ConfigInputError: For a LitGPT config (``explain`` reads it; training LitGPT is a Fabric loop, see the recipe).
    """
    if layout.kind == "litgpt":
        raise ConfigInputError(
            f"{source}: a LitGPT config has no 'trainer:' section, and `train` builds a Lightning Trainer from one. "
            "`explain` reads LitGPT configs; to train LitGPT with this library, see docs/recipes.md, 'LitGPT "
            "fine-tune with the Fabric plugin'."
        )
    return layout


def _node(cfg: DictConfig, name: str) -> Any:
    if name not in cfg.keys():  # noqa: SIM118 - `in` is False for a ??? section, which must be reported
        return None
    try:
        return cfg[name]
    except OmegaConfBaseException as err:
        raise ConfigInputError(f"section {name!r}: {_one_line(err)}") from err


def _resolved(cfg: DictConfig, name: str) -> Any:
    """A top-level section resolved; a value in it that is ``???`` or does not resolve is an error naming its path."""
    return resolve_value(_node(cfg, name), path=name)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigInputError(f"config file not found: {path}")
    try:
        # OmegaConf fails on a top level that is not a mapping (`false`, `'0'`) with an OSError or an assert.
        top = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        cfg = OmegaConf.load(path) if top is None or isinstance(top, yaml.MappingNode) else None
    except yaml.YAMLError as err:
        raise ConfigInputError(f"{path}: not valid YAML: {_one_line(err)}") from err
    except OmegaConfBaseException as err:
        raise ConfigInputError(f"{path}: cannot be loaded: {_one_line(err)}") from err
    except UnicodeDecodeError as err:  # a binary file, or text saved as UTF-16
        raise ConfigInputError(
            f"{path}: not a UTF-8 text file (byte {err.object[err.start : err.start + 1]!r} at offset {err.start}); "
            "save the config as UTF-8 YAML."
        ) from err
    except RecursionError as err:  # only a YAML alias inside its own anchor (`a: &x [*x]`) nests without end
        raise ConfigInputError(
            f"{path}: a YAML alias refers to its own anchor (a structure that contains itself)."
        ) from err
    except OSError as err:
        raise ConfigInputError(f"{path}: cannot be read: {_one_line(err)}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigInputError(f"{path}: the top level must be a mapping of sections ({', '.join(RUN_SECTIONS)}).")
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
        # select reads a ??? as null: kept as ???, so what reads it says it is missing instead of reading null.
        new = "???" if value.strip() == "???" else OmegaConf.select(parsed, key)
        OmegaConf.update(cfg, key, new, force_add=True)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise ConfigInputError(f"override {item!r}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def section(cfg: DictConfig, name: str) -> dict[str, Any] | None:
    """A section as a plain dict with interpolations resolved, or ``None`` if absent."""
    plain = _resolved(cfg, name)
    if plain is None:
        return None
    if not isinstance(plain, dict):
        raise ConfigInputError(f"section {name!r} must be a mapping, got {plain!r}.")
    return plain
