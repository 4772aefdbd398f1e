"""Runtime guard: checks the real optimizers against the pairing rule and reports the precision contract."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_precision.callbacks.underflow import UpdateUnderflowMonitor
from lightning_precision.dtypes import parse_dtype
from lightning_precision.modes import known_mode
from lightning_precision.policy import OnUnsafe, PolicyHolder, check_and_enforce, trainer_components
from lightning_precision.report import (
    CHECKPOINT_KEY,
    PrecisionContract,
    log_contract,
    report_storage_change,
    storage_changes,
    trainer_contract,
)
from lightning_precision.resumed_state import check_trainer_resume, report_weight_changes
from lightning_precision.values import parse_bool


class PrecisionGuard(PolicyHolder, Callback):
    """Judges the live optimizers and parameters at fit start and reports the precision contract.

    At fit start the optimizers exist (including ones built in ``configure_optimizers``, which no config shows), so the
    pairing rule is applied to what will really train. After the first optimizer step the contract is reported again
    with the optimizer-state dtype read from the state tensors; a resumed fit reports it once, at train start, read from
    the state loaded from the checkpoint (never a prediction of what is being loaded). The contract is logged on rank
    zero, added to the loggers' hyperparameters and written into checkpoints under ``"precision_contract"`` (read it
    back with :func:`~lightning_precision.report.read_precision_contract`); with an
    :class:`~lightning_precision.callbacks.UpdateUnderflowMonitor` in the callbacks, the checkpoint's contract also
    records its latest stale-update fractions.

    Args:
        on_unsafe: ``"warn"``, ``"error"`` (raise :class:`PrecisionPairingError` before the first step) or
            ``"ignore"``; ``None`` (default): the policy set on the precision plugin or strategy, else ``"warn"``.
        peft: Only adapters train: the storage dtype is left to the model; the adapters are still judged by their dtype.
        log_table: Log the contract table on rank zero.

    Raises:
        PrecisionConfigError: If ``on_unsafe`` is not a valid policy.
    """

    def __init__(self, on_unsafe: OnUnsafe | None = None, peft: bool = False, log_table: bool = True) -> None:
        self._init_policy(on_unsafe)
        self.peft = parse_bool(peft, what="PrecisionGuard(peft=...)", spellings=True)
        self.log_table = log_table
        self.contract: PrecisionContract | None = None
        self._state_observed = False
        self._restored: PrecisionContract | None = None
        self._loaded: dict[str, Any] | None = None  # the checkpoint being resumed, until fit start has checked it

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adopt_on_unsafe(trainer_components(trainer))
        self._state_observed = False
        # A resume loads the optimizer state after fit start: its table waits for on_train_start, where the state is
        # known, rather than printing a prediction of what is about to be loaded.
        resuming = trainer.ckpt_path is not None
        loaded, self._loaded = self._loaded, None
        if loaded is not None and resuming:  # single process: Lightning loads the optimizer state after this hook
            names = {id(p): n for n, p in pl_module.named_parameters()}
            saved, weights = loaded.get("optimizer_states") or [], loaded.get("state_dict") or {}
            check_trainer_resume(trainer.optimizers, saved, weights, names, trainer.ckpt_path)
            if self._restored is None:  # no contract stored: what changed is read from the saved tensors
                report_weight_changes(weights, pl_module, trainer.ckpt_path)
        self.contract = self._build_contract(trainer, observe_state=False, log=not resuming)
        if self._restored is not None:
            _report_resume(self._restored, self.contract)
            self._restored = None
        for logger in trainer.loggers:
            logger.log_hyperparams({CHECKPOINT_KEY: self.contract.to_dict()})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state_observed or not any(optimizer.state for optimizer in trainer.optimizers):
            return
        self._state_observed = True
        where = "resumed: state read from the checkpoint"
        self.contract = self._build_contract(trainer, observe_state=True, where=where)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._state_observed or trainer.global_step < 1:
            return
        self._state_observed = True
        self.contract = self._build_contract(trainer, observe_state=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.contract is not None:
            monitor = next((c for c in trainer.callbacks if isinstance(c, UpdateUnderflowMonitor)), None)
            if monitor is not None and monitor.latest is not None:  # what was measured, next to what was set up
                self.contract.measured = monitor.latest.metrics()
            checkpoint[CHECKPOINT_KEY] = self.contract.to_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Compared at fit start, once the precision has converted the module and the optimizers exist.
        stored = checkpoint.get(CHECKPOINT_KEY)
        self._restored = PrecisionContract.from_dict(stored) if stored else None
        # Before fit start in a single-process fit (its optimizer state is checked and converted there); a strategy
        # that restores after setup (FSDP2) has loaded and checked its state itself, so nothing is kept.
        self._loaded = None if trainer.strategy.restore_checkpoint_after_setup else checkpoint

    def _build_contract(
        self, trainer: pl.Trainer, *, observe_state: bool, where: str | None = None, log: bool = True
    ) -> PrecisionContract:
        where = where or ("after first step" if observe_state else "fit start")
        mode = known_mode(trainer.precision)
        verdicts = check_and_enforce(
            trainer.optimizers, on_unsafe=self.on_unsafe, peft=self.peft, where=where, precision=mode
        )
        contract = trainer_contract(trainer, trainer.optimizers, verdicts, observe_state=observe_state)
        if self.log_table and log:
            log_contract(contract, verdicts, on_unsafe=self.on_unsafe, where=where)
        return contract


def _report_resume(stored: PrecisionContract, current: PrecisionContract) -> None:
    for optimizer, then, now in storage_changes(stored, current):
        if then == "-" or now == "-":
            continue
        what = f"{optimizer} parameters (precision={stored.precision!r}, now {current.precision!r})"
        report_storage_change(parse_dtype(then), parse_dtype(now), what=what)
