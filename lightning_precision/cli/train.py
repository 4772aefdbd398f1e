"""``lightning-precision train``: a real Lightning run of the built-in task, driven by a YAML config.

The trainer arguments go through :func:`~lightning_precision.config.resolve_trainer_cfg`, so the run gets the
library's plugins, its pairing check and its runtime guard exactly as a user's own script would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, ListConfig

from lightning_precision._imports import import_object
from lightning_precision.cli.yaml_loading import ConfigInputError, section
from lightning_precision.config import TrainerKwargs, resolve_trainer_cfg
from lightning_precision.config_classes import check_arguments
from lightning_precision.config_layouts import MODEL_LAYOUT_KEYS
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import parse_number

# numpy's seed range, which Lightning's seed_everything enforces.
_MAX_SEED = 2**32 - 1
# Keys of the data section the model must agree with: the task's model is built to the data's shapes.
_SHARED_SHAPE_KEYS = ("in_features", "audio_features", "out_features")


@dataclass
class TaskRun:
    """A finished run of the built-in task.

    Attributes:
        trainer: The trainer after ``fit``.
        module: The trained task module (its ``step_losses`` hold the per-step losses).
        kwargs: What :func:`resolve_trainer_cfg` resolved.
        seconds: Wall-clock seconds of ``trainer.fit``.
        log_dir: Where the CSV log was written (``None`` without a logger).
    """

    trainer: pl.Trainer
    module: pl.LightningModule
    kwargs: TrainerKwargs
    seconds: float
    log_dir: Path | None

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return int(self.trainer.global_step)

    def summary(self) -> str:
        """A few lines for the console: steps, final loss, time, where the logs and checkpoints are."""
        losses = getattr(self.module, "step_losses", [])
        tail = losses[-min(len(losses), 100) :]
        final = f"{sum(tail) / len(tail):.5f} (mean of the last {len(tail)} steps)" if tail else "-"
        lines = [f"Trained {self.steps} steps in {self.seconds:.1f} s; final loss {final}."]
        if self.log_dir is not None:
            lines.append(f"CSV log: {self.log_dir / 'metrics.csv'}")
        ckpts = sorted(
            str(p) for cb in self.trainer.checkpoint_callbacks for p in [cb.best_model_path, cb.last_model_path] if p
        )
        if ckpts:
            lines.append(f"Checkpoints: {', '.join(dict.fromkeys(ckpts))}")
        return "\n".join(lines)


def print_summary(run: TaskRun) -> None:
    """Print the run's summary once per run: on global rank zero only (every rank of a multi-process run finishes
    ``fit`` and returns here)."""
    if run.trainer.is_global_zero:
        print(run.summary())


def build_task(
    model_cfg: Mapping[str, Any] | None,
    optimizer_cfg: Mapping[str, Any] | None,
    data_cfg: Mapping[str, Any] | None,
    seed: int = 0,
    optimizer_where: str = "optimizer",
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Build the built-in task's model and data from config sections.

    Args:
        model_cfg: Model arguments of :class:`lightning_precision.demos.TaskModule`; the keys the config layouts
            read (``torch_dtype``, and an optimizer section such as NeMo's ``optim``) are not passed on.
        optimizer_cfg: ``_target_``, ``lr`` (default: the task's) and further optimizer arguments: the optimizer
            that was judged (``TrainerKwargs.optimizer``), wherever the config put it.
        data_cfg: Arguments of :class:`lightning_precision.demos.TaskDataModule`.
        seed: Seed of the initial weights and the data order, unless the sections set their own.
        optimizer_where: Where the config put the optimizer section, for messages (``"model.optim"``).

    Returns:
        The module and the data module.

    Raises:
        PrecisionConfigError: (:class:`ConfigInputError`) If a section has an argument the task or the optimizer does
            not take, or a value out of range (``lr: -1``, ``depth: 0``).
    """
    from lightning_precision.demos import TaskDataModule, TaskModule

    data_args = {"data_seed": seed, "shuffle_seed": seed, **dict(data_cfg or {})}
    model_args = {k: v for k, v in dict(model_cfg or {}).items() if k not in MODEL_LAYOUT_KEYS}
    model_args.setdefault("init_seed", seed)
    for key in _SHARED_SHAPE_KEYS:
        if key in data_args:
            model_args.setdefault(key, data_args[key])
    if optimizer_cfg:
        opt = dict(optimizer_cfg)
        if "lr" in opt:  # otherwise the task's own tuned default
            model_args["lr"] = parse_number(opt.pop("lr"), what=f"{optimizer_where}.lr", low=0)
        model_args["optimizer"] = opt.pop("_target_", "torch.optim.AdamW")
        model_args["optimizer_kwargs"] = {k: v for k, v in opt.items() if not str(k).startswith("_")}
        _check_optimizer_arguments(model_args["optimizer"], model_args["optimizer_kwargs"], optimizer_where)
    return _construct(TaskModule, model_args, "model"), _construct(TaskDataModule, data_args, "data")


def _check_optimizer_arguments(target: Any, kwargs: dict[str, Any], where: str) -> None:
    """A misspelt optimizer keyword is refused here, naming the valid ones, not when ``fit`` builds the optimizer."""
    if isinstance(target, str):
        target = import_object(target, where=f"{where}._target_")
    if isinstance(target, type):
        check_arguments(target, kwargs, where)


def _construct(cls: type, args: dict[str, Any], section_name: str) -> Any:
    try:
        return cls(**args)
    except (TypeError, PrecisionConfigError) as err:  # an argument the task does not take, or a bad value
        raise ConfigInputError(f"section {section_name!r}: {err}") from err


def fit_task(
    cfg: DictConfig | Mapping[str, Any],
    *,
    logger: Any = None,
    extra_callbacks: list[pl.Callback] | None = None,
    on_unsafe: str | None = None,
) -> TaskRun:
    """Resolve a run config, build the built-in task and fit it.

    Args:
        cfg: A run config (``trainer``, ``model``, ``optimizer``, ``data``, ``seed``).
        logger: Passed to the trainer (``None``: the config's ``logger`` setting, or none).
        extra_callbacks: Added to the resolved callbacks.
        on_unsafe: Overrides the config's ``lightning_precision.on_unsafe``.

    Returns:
        The finished run.

    Raises:
        PrecisionConfigError: If the config is not valid.
        PrecisionPairingError: If the config is unsafe under ``on_unsafe="error"``.
    """
    seed = parse_number(cfg.get("seed", 0) or 0, what="seed", integer=True, low=0, high=_MAX_SEED)
    model_cfg = _plain(cfg, "model")
    kwargs = resolve_trainer_cfg(
        _plain(cfg, "trainer") or {}, model=model_cfg, optimizer=_plain(cfg, "optimizer"), on_unsafe=on_unsafe
    )
    pl.seed_everything(seed, verbose=False)
    # The optimizer judged is the one built, wherever the config put it.
    module, data = build_task(
        model_cfg, kwargs.optimizer, _plain(cfg, "data"), seed, kwargs.optimizer_path or "optimizer"
    )
    apply_storage_dtype(module, kwargs)
    trainer_args = dict(kwargs)
    trainer_args["callbacks"] = [*kwargs["callbacks"], *(extra_callbacks or [])]
    if logger is not None:
        trainer_args["logger"] = logger
    trainer_args.setdefault("logger", False)
    trainer = _make_trainer(trainer_args)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    log_dir = Path(trainer.logger.log_dir) if isinstance(trainer.logger, CSVLogger) else None
    return TaskRun(trainer, module, kwargs, seconds, log_dir)


def _plain(cfg: DictConfig | Mapping[str, Any], name: str) -> dict[str, Any] | None:
    if isinstance(cfg, DictConfig):
        return section(cfg, name)
    value = cfg.get(name)
    return dict(value) if value is not None else None


def apply_storage_dtype(module: torch.nn.Module, kwargs: TrainerKwargs) -> None:
    """Store the parameters in the dtype the pairing rule chose, where the precision plugin does not cast them.

    ``*-true`` and ``*-flash`` plugins cast the module themselves (flash keeps normalization layers in fp32), so
    only precisions that leave storage to the model (``32-true``, ``*-mixed``) are cast here.

    Args:
        module: The model, cast in place.
        kwargs: What :func:`resolve_trainer_cfg` resolved (its ``storage_dtype`` and ``precision_mode``).
    """
    mode = kwargs.precision_mode
    if kwargs.storage_dtype is None or (mode is not None and mode.storage_dtype is not None):
        return
    module.to(dtype=kwargs.storage_dtype)


def _make_trainer(trainer_args: dict[str, Any]) -> pl.Trainer:
    try:
        return pl.Trainer(**trainer_args)
    except TypeError as err:  # an unknown Trainer argument in the config
        raise ConfigInputError(f"trainer: {err}") from err
    except (MisconfigurationException, ValueError, RuntimeError) as err:  # e.g. accelerator: gpu on a CPU machine
        accelerator = trainer_args.get("accelerator")
        hint = ""
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            hint = f" (trainer.accelerator={accelerator!r} needs a CUDA device and there is none here)"
        raise PrecisionConfigError(f"trainer: {err}{hint}") from err


def train_from_config(
    cfg: DictConfig, *, output_dir: Path, name: str = "train", ckpt_every: int | None = None
) -> TaskRun:
    """The ``train`` subcommand: a run with a progress bar, a CSV log and, when asked, checkpoints.

    Checkpoints are written when the config sets ``trainer.enable_checkpointing: true``, lists a
    ``ModelCheckpoint`` callback, or ``ckpt_every`` is given; otherwise checkpointing is off (Lightning's default
    would write one silently).

    Args:
        cfg: The run config.
        output_dir: Root of the CSV logs and checkpoints.
        name: Experiment name (the config file's stem).
        ckpt_every: Save a checkpoint every this many steps.

    Returns:
        The finished run.
    """
    _show_library_log()
    trainer_cfg = cfg.trainer
    callbacks: list[pl.Callback] = []
    if ckpt_every is not None:
        if ckpt_every < 1:
            raise ConfigInputError(f"--ckpt-every must be a positive number of steps, got {ckpt_every}.")
        callbacks.append(ModelCheckpoint(every_n_train_steps=ckpt_every, save_top_k=-1, save_last=True))
        trainer_cfg.enable_checkpointing = True
    elif "enable_checkpointing" not in trainer_cfg and not _has_checkpoint_callback(trainer_cfg):
        trainer_cfg.enable_checkpointing = False
    trainer_cfg.setdefault("default_root_dir", str(output_dir))
    trainer_cfg.setdefault("log_every_n_steps", 1)
    logger = CSVLogger(save_dir=str(output_dir), name=name)
    return fit_task(cfg, logger=logger, extra_callbacks=callbacks)


def _has_checkpoint_callback(trainer_cfg: Any) -> bool:
    # Only reads the entries: a malformed list is refused, naming it, when the callbacks are resolved.
    entries = trainer_cfg.get("callbacks") or []
    for entry in entries if isinstance(entries, (list, ListConfig)) else [entries]:
        if isinstance(entry, (Mapping, DictConfig)):
            target = str(entry.get("_target_") or entry.get("class_path") or "")
            if target.endswith("ModelCheckpoint"):
                return True
    return False


def _show_library_log() -> None:
    """Show the library's INFO lines (the precision contract table) on the console, as Lightning shows its own."""
    log = logging.getLogger("lightning_precision")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
