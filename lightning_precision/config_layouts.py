"""Reading other frameworks' config layouts: where the optimizer and the storage dtype sit in a NeMo, LightningCLI
or composed Hydra config, turned into what the catalogue and the storage decision already take.

Nothing here judges an optimizer or decides a dtype: it only finds the sections and rewrites NeMo's optimizer names
as import paths (``{name: adamw, lr: 1e-4}`` becomes ``{"_target_": "torch.optim.AdamW", "lr": 1e-4}``), so the
catalogue classifies a NeMo config exactly as it classifies our own.

Where each layout puts the optimizer (all are looked at; two that disagree are an error naming both):

==============================  ======================================================================
``optimizer``                   ours (``_target_``) and LightningCLI's (``class_path``/``init_args``)
``model.optim``                 NeMo (``name`` from NeMo's optimizer registry, or ``_target_``)
``model.optimizer``             a module that takes its optimizer as an argument (LightningCLI without ``class_path``)
``model.init_args.optimizer``   LightningCLI, when the module takes the optimizer as an init argument
==============================  ======================================================================

and the storage dtype: ``model.torch_dtype`` (ours, NeMo, Hugging Face) or ``model.init_args.torch_dtype``
(LightningCLI).

LitGPT's configs (no ``trainer:`` section) and NeMo 2's precision plugin are read by
:mod:`~lightning_precision.config_frameworks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_precision._logging import info_rank_zero
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.config_frameworks import is_litgpt, read_litgpt
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError

# NeMo's optimizer registry (``AVAILABLE_OPTIMIZERS`` in ``nemo/core/optim/optimizers.py``) by name, as the import
# path of the class each name builds. ``lamb``, ``fused_adam`` and the two Megatron Adams are registered by NeMo
# only when apex imports; their paths are the real classes, so the catalogue classifies them by path either way.
NEMO_OPTIMIZERS: dict[str, str] = {
    "sgd": "torch.optim.SGD",
    "adam": "torch.optim.Adam",
    "adamw": "torch.optim.AdamW",
    "adadelta": "torch.optim.Adadelta",
    "adamax": "torch.optim.Adamax",
    "adagrad": "torch.optim.Adagrad",
    "rmsprop": "torch.optim.RMSprop",
    "rprop": "torch.optim.Rprop",
    "novograd": "nemo.core.optim.novograd.Novograd",
    "adafactor": "nemo.core.optim.adafactor.Adafactor",
    "adan": "nemo.core.optim.adan.Adan",
    "lamb": "apex.optimizers.FusedLAMB",
    "fused_adam": "apex.optimizers.FusedAdam",
    "distributed_fused_adam": "nemo.core.optim.distributed_adam.MegatronDistributedFusedAdam",
    "megatron_fused_adam": "nemo.core.optim.megatron_fused_adam.MegatronFusedAdam",
}
NEMO_DEFAULT_OPTIMIZER = "adam"  # what NeMo's ModelPT builds when model.optim names none
# Keys of NeMo's model.optim that are not optimizer arguments: the scheduler, and the ways of naming the class.
NEMO_SCHEDULER_KEY = "sched"  # in NeMo's model.optim: the scheduler, never read
_NEMO_NOT_ARGUMENTS = ("name", NEMO_SCHEDULER_KEY, "cls", "_target_", "args")

OPTIMIZER_PATHS = ("optimizer", "model.optim", "model.optimizer", "model.init_args.optimizer")
TORCH_DTYPE_PATHS = ("model.torch_dtype", "model.init_args.torch_dtype")
# Keys of the model section read here rather than passed to the model.
MODEL_LAYOUT_KEYS = ("optim", "optimizer", "torch_dtype")
# Everything read from the model section, relative to it: the only parts of it that are resolved.
MODEL_READ_PATHS = tuple(p.removeprefix("model.") for p in (*OPTIMIZER_PATHS, *TORCH_DTYPE_PATHS) if p != "optimizer")
MODEL_DTYPE_PATHS = tuple(p.removeprefix("model.") for p in TORCH_DTYPE_PATHS)

RUN_SECTIONS = ("trainer", "model", "optimizer", "data", "seed")
HYDRA_COMPOSE_HINT = (
    "pass the composed config instead, e.g. the output of `python app.py --cfg job` (Hydra prints the config it "
    "composed from the defaults list and overrides, without running the app)"
)


@dataclass(frozen=True)
class Found:
    """A value found in a config, and where.

    Attributes:
        value: For an optimizer: what :func:`~lightning_precision.catalogue.classify_optimizer` takes (a mapping is
            rewritten as a ``_target_`` config); for a dtype: the spelling as written.
        path: Where it was found (``"model.optim"``), for messages.
        note: How it was read, when that is not obvious (a NeMo name mapped to a class), else ``""``.
    """

    value: Any
    path: str
    note: str = ""


@dataclass
class RunLayout:
    """The sections of a whole run config that this library reads, and notes on what it did not read.

    Attributes:
        trainer: The trainer section.
        model: The model section, or ``None``.
        optimizer: The top-level optimizer section, or ``None`` (the model section may still hold one).
        notes: One line each: the top-level sections ignored, and a Hydra defaults list that was not composed.
        kind: ``"run"`` (a trainer section: ours, NeMo, LightningCLI, Hydra) or ``"litgpt"`` (read from the top level).
    """

    trainer: dict[str, Any]
    model: dict[str, Any] | None
    optimizer: Any
    notes: list[str] = field(default_factory=list)
    kind: str = "run"


def read_run_layout(cfg: Mapping[str, Any], *, source: str = "config", log_notes: bool = True) -> RunLayout:
    """The sections of a whole config (ours, NeMo's, LightningCLI's, a composed Hydra one or LitGPT's), as plain data.

    Top-level sections other than :data:`RUN_SECTIONS` (``name``, ``exp_manager``, ``hydra``, ...) are not about
    precision: they are ignored with one note, also logged. A ``defaults`` list means Hydra did not compose the file,
    so the sections it would add are missing: that gets its own note.

    Args:
        cfg: The whole config, interpolations resolved (plain mappings).
        source: Where it came from (a file name), for messages.
        log_notes: Also log each note (INFO, rank zero).

    Returns:
        The sections and the notes.

    Raises:
        PrecisionConfigError: If there is no ``trainer`` mapping (with the Hydra hint when a ``defaults`` list
            suggests the file was not composed) and the file is not LitGPT's, or a section that must be a mapping is
            not one; for LitGPT's, see :func:`~lightning_precision.config_frameworks.read_litgpt`.
    """
    if is_litgpt(cfg):
        litgpt = read_litgpt(cfg, source=source)
        layout = RunLayout(litgpt.trainer, None, litgpt.optimizer, litgpt.notes, kind="litgpt")
    else:
        layout = _read_run_sections(cfg, source)
    for note in layout.notes if log_notes else ():
        info_rank_zero(f"lightning_precision: {note}.")
    return layout


def _read_run_sections(cfg: Mapping[str, Any], source: str) -> RunLayout:
    notes = []
    ignored = sorted(str(k) for k in cfg if k not in RUN_SECTIONS and k != "defaults")
    if ignored:
        notes.append(f"ignored top-level section(s) {', '.join(ignored)}: not about precision")
    if "defaults" in cfg:
        notes.append(f"{source} has a Hydra 'defaults' list: sections it names are not read; {HYDRA_COMPOSE_HINT}")
    trainer = cfg.get("trainer")
    if not isinstance(trainer, Mapping):
        hint = f"; it has a Hydra 'defaults' list, so {HYDRA_COMPOSE_HINT}" if "defaults" in cfg else ""
        raise PrecisionConfigError(f"{source}: needs a 'trainer:' mapping (pl.Trainer arguments){hint}.")
    model = cfg.get("model")
    if model is not None and not isinstance(model, Mapping):
        raise PrecisionConfigError(f"{source}: section 'model' must be a mapping, got {model!r}.")
    return RunLayout(dict(trainer), dict(model) if model is not None else None, cfg.get("optimizer"), notes)


def find_optimizer(model: Mapping[str, Any] | None, optimizer: Any = None) -> Found | None:
    """The optimizer section, wherever the layout puts it (see :data:`OPTIMIZER_PATHS`).

    Args:
        model: The model section (plain mapping), or ``None``.
        optimizer: The top-level optimizer section: a ``_target_``/``class_path`` mapping, an import path, a class
            or an instance; ``None`` if absent.

    Returns:
        The optimizer (mappings rewritten as ``_target_`` configs) and its path, or ``None`` if no layout has one.
        Sections found in several places that agree (same class, no argument set differently) are merged.

    Raises:
        PrecisionConfigError: If two sections disagree (both paths named), a NeMo name is not in NeMo's registry
            (the known names listed), or a section names no optimizer.
    """
    found = [_read_optimizer(path, value) for path, value in _candidates(model, optimizer)]
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        first = _agree(first, other)
    return first


def find_torch_dtype(model: Mapping[str, Any] | None) -> Found | None:
    """The model's storage dtype as written, wherever the layout puts it (see :data:`TORCH_DTYPE_PATHS`).

    Args:
        model: The model section (plain mapping or OmegaConf), or ``None``.

    Returns:
        The spelling as written and its path, or ``None`` if the layout sets none. Both places may set it if they
        name the same dtype (``bf16`` and ``bfloat16``); the first is returned.

    Raises:
        PrecisionConfigError: If both places set it and they differ (both named), or one is not a dtype.
    """
    found = [Found(v, p) for p, v in _candidates(model, None, TORCH_DTYPE_PATHS) if v is not None]
    if len(found) == 2 and parse_dtype(found[0].value, what=found[0].path) != parse_dtype(
        found[1].value, what=found[1].path
    ):
        raise PrecisionConfigError(
            f"{found[0].path}={found[0].value!r} and {found[1].path}={found[1].value!r} disagree on the model's "
            "storage dtype; set one of them."
        )
    return found[0] if found else None


def _candidates(
    model: Mapping[str, Any] | None, optimizer: Any, paths: tuple[str, ...] = OPTIMIZER_PATHS
) -> list[tuple[str, Any]]:
    """``(path, value)`` for each of ``paths`` present (``optimizer`` is the top-level section)."""
    out = []
    for path in paths:
        if path == "optimizer":
            value = optimizer
        else:
            value = model
            for key in path.split(".")[1:]:
                value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None:
            out.append((path, value))
    return out


def _read_optimizer(path: str, value: Any) -> Found:
    if path == "model.optim":
        return _read_nemo_optim(value)
    if isinstance(value, str):
        return Found({"_target_": _lightning_cli_path(value)}, path)
    if not isinstance(value, Mapping):
        return Found(value, path)  # a class or an instance, given in Python: the catalogue reads it as is
    if "class_path" in value:
        args = value.get("init_args") or {}
        if not isinstance(args, Mapping):
            raise PrecisionConfigError(f"{path}.init_args must be a mapping of arguments, got {args!r}.")
        return Found({"_target_": _lightning_cli_path(str(value["class_path"])), **args}, path)
    if "_target_" in value:
        return Found(dict(value), path)
    raise PrecisionConfigError(
        f"{path}={dict(value)!r} names no optimizer: give '_target_' (Hydra) or 'class_path' (LightningCLI)."
    )


def _lightning_cli_path(path: str) -> str:
    """LightningCLI (jsonargparse) accepts a bare class name of ``torch.optim`` (``class_path: AdamW``)."""
    if "." not in path and isinstance(getattr(torch.optim, path, None), type):
        return f"torch.optim.{path}"
    return path


def _read_nemo_optim(optim: Any) -> Found:
    """NeMo's ``model.optim``, read as NeMo's ModelPT builds it: ``_target_`` (or the older ``cls``) names the class,
    else ``name`` in NeMo's registry (``adam`` when absent); ``sched`` is the scheduler; the older ``args`` holds the
    arguments (``args.params`` when given); everything else is an optimizer argument."""
    where = "model.optim"
    if not isinstance(optim, Mapping):
        raise PrecisionConfigError(f"{where} must be a mapping (NeMo: name, lr, betas, ...), got {optim!r}.")
    args = optim.get("args")
    if args is not None and not isinstance(args, Mapping):
        raise PrecisionConfigError(f"{where}.args must be a mapping of optimizer arguments, got {args!r}.")
    if args is not None:
        kwargs = {k: v for k, v in dict(args.get("params", args)).items() if k != "name"}
    else:
        kwargs = {k: v for k, v in optim.items() if k not in _NEMO_NOT_ARGUMENTS}
    if "lr" in optim:
        kwargs["lr"] = optim["lr"]
    target = optim.get("_target_", optim.get("cls"))
    if target is not None:
        return Found({"_target_": str(target), **kwargs}, where)
    name = optim.get("name", NEMO_DEFAULT_OPTIMIZER)
    key = str(name).lower()
    if key not in NEMO_OPTIMIZERS:
        raise PrecisionConfigError(
            f"{where}.name={name!r} is not an optimizer NeMo registers. Known names: "
            f"{', '.join(sorted(NEMO_OPTIMIZERS))}; or give the class as {where}._target_."
        )
    given = f"name: {name}" if "name" in optim else f"no name: NeMo's default {NEMO_DEFAULT_OPTIMIZER}"
    target = NEMO_OPTIMIZERS[key]
    return Found({"_target_": target, **kwargs}, where, f"{where} ({given}) read as {target}")


def _agree(a: Found, b: Found) -> Found:
    """One optimizer from two sections that must describe the same one."""

    def disagree(detail: str) -> PrecisionConfigError:
        return PrecisionConfigError(
            f"{a.path} and {b.path} both set the optimizer and disagree ({detail}): {a.path}={_show(a.value)}, "
            f"{b.path}={_show(b.value)}. Keep one of them."
        )

    # The catalogue's name is the class's own path, so torch.optim.AdamW and torch.optim.adamw.AdamW agree.
    name_a, name_b = classify_optimizer(a.value).name, classify_optimizer(b.value).name
    if name_a != name_b:
        raise disagree(f"{name_a} vs {name_b}")
    if not (isinstance(a.value, Mapping) and isinstance(b.value, Mapping)):
        return a  # a class or instance given in Python carries its own settings
    for key in sorted(set(a.value) & set(b.value) - {"_target_"}):
        if _plain(a.value[key]) != _plain(b.value[key]):
            raise disagree(f"{key}: {a.value[key]!r} vs {b.value[key]!r}")
    return Found({**b.value, **a.value}, a.path, a.note or b.note)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    return repr(dict(value)) if isinstance(value, Mapping) else repr(value)
