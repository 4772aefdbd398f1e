"""The update-underflow monitor as a Lightning callback: runs the meter, logs its fractions and warns with the fix.

The trap the pairing rule guards against (half-precision storage updated in place) shows no symptom: the gradient
norm stays sane and the loss plateaus higher. This callback makes it a number; what is measured is described in
:mod:`lightning_precision.underflow.meter`, which also runs without a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_precision._logging import info_once, warn_once
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.pairing import Verdict, check_optimizer, judge
from lightning_precision.underflow import (
    METRIC_EXP_AVG_SQ,
    METRIC_UPDATE,
    UnderflowMeter,
    UnderflowReport,
    sample_indices,
)
from lightning_precision.values import parse_bool, parse_number

__all__ = ["METRIC_EXP_AVG_SQ", "METRIC_UPDATE", "UnderflowReport", "UpdateUnderflowMonitor", "sample_indices"]


class UpdateUnderflowMonitor(Callback):
    """Measures the fraction of optimizer updates that round away in the stored parameters.

    Every ``every_n_steps`` optimizer steps it samples up to ``max_elements_per_tensor`` elements of each trainable
    parameter (a fixed-seed index per tensor, the same on every rank; the local shard of a DTensor), snapshots them
    just before the step and compares after it, estimating the update the optimizer intended from its own state.
    See :mod:`lightning_precision.underflow.meter` for exactly which elements count. It logs ``precision/stale_update_fraction``,
    ``precision/stale_exp_avg_sq_fraction`` and per-group keys through the Trainer's loggers, keeps the latest
    :class:`UnderflowReport` in :attr:`latest`, and emits a :class:`~lightning_precision.PrecisionWarning` once
    (rank zero, once per cause) when a fraction stays above ``threshold`` for ``patience`` consecutive measurements,
    naming the pairing rule's fix.

    Args:
        every_n_steps: Measure every this many optimizer steps (per optimizer), starting with the first.
        threshold: Stale fraction above which a measurement counts towards the warning, in ``[0, 1]``.
        patience: Consecutive measurements above ``threshold`` before warning.
        max_elements_per_tensor: Elements sampled per parameter tensor (per rank); bounds the cost.
        top_k: Worst parameters kept in :attr:`UnderflowReport.worst_params` and named in the warning.
        seed: Seed of the sampled indices.
        prog_bar: Also show the overall fractions in the progress bar.

    Raises:
        PrecisionConfigError: (a ``ValueError``) if an argument is outside its valid range.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        threshold: float = 0.1,
        patience: int = 3,
        max_elements_per_tensor: int = 4096,
        top_k: int = 5,
        seed: int = 0,
        prog_bar: bool = False,
    ) -> None:
        self.every_n_steps = _positive_int(every_n_steps, "every_n_steps")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise PrecisionConfigError(
                f"UpdateUnderflowMonitor(threshold={threshold!r}) is not valid: it is a fraction in [0, 1]."
            )
        self.threshold = float(threshold)
        self.patience = _positive_int(patience, "patience")
        self.max_elements_per_tensor = _positive_int(max_elements_per_tensor, "max_elements_per_tensor")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise PrecisionConfigError(f"UpdateUnderflowMonitor(top_k={top_k!r}) is not valid: use an int >= 0.")
        self.top_k = top_k
        self.seed = parse_number(seed, what="UpdateUnderflowMonitor(seed=...)", integer=True)
        self.prog_bar = parse_bool(prog_bar, what="UpdateUnderflowMonitor(prog_bar=...)", spellings=True)
        self.meter = UnderflowMeter(every_n_steps, max_elements_per_tensor, top_k, seed)
        self._consecutive = {"update": 0, "exp_avg_sq": 0}

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer.optimizers, pl_module.named_parameters())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        report = self.collect(step=trainer.global_step)
        if report is None:
            return
        metrics = report.metrics()
        if not metrics:
            return
        overall = (METRIC_UPDATE, METRIC_EXP_AVG_SQ)
        for name, value in metrics.items():
            # Lightning's convention for a callback's figures: into trainer.callback_metrics, where EarlyStopping,
            # ModelCheckpoint(monitor=...) and the progress bar read them. The values are already reduced over ranks.
            prog_bar = self.prog_bar and name in overall
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, prog_bar=prog_bar, sync_dist=False)
        for logger in trainer.loggers:  # logged directly: Lightning's log_every_n_steps would drop them
            logger.log_metrics(metrics, step=trainer.global_step)
        if not trainer.loggers:
            info_once(
                "underflow-no-logger",
                "UpdateUnderflowMonitor: the Trainer has no logger, so its fractions are only in "
                f"trainer.callback_metrics (e.g. {METRIC_UPDATE!r}) and in the monitor's .latest report.",
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()

    # -- Measuring, in any loop -----------------------------------------------------------------------------------

    @property
    def latest(self) -> UnderflowReport | None:
        """The latest report, ``None`` before the first measurement."""
        return self.meter.latest

    def attach(
        self, optimizers: Iterable[torch.optim.Optimizer], named_parameters: Iterable[tuple[str, torch.Tensor]] = ()
    ) -> None:
        """Start measuring (done at fit start; public for loops without a Trainer): see :meth:`UnderflowMeter.attach`."""
        self._consecutive = {"update": 0, "exp_avg_sq": 0}
        self.meter.attach(optimizers, named_parameters)

    def detach(self) -> None:
        """Stop measuring: remove the optimizer hooks."""
        self.meter.detach()

    def collect(self, step: int = 0) -> UnderflowReport | None:
        """:meth:`UnderflowMeter.collect` (every rank calls it at the same point), then warn if due."""
        report = self.meter.collect(step)
        if report is not None:
            self._maybe_warn(report, self.meter.measured_optimizers)
        return report

    # -- Warning ----------------------------------------------------------------------------------------------------

    def _maybe_warn(self, report: UnderflowReport, optimizers: list[torch.optim.Optimizer]) -> None:
        checks = (
            ("update", report.stale_update_fraction, "parameter updates", "the stored value did not change"),
            ("exp_avg_sq", report.stale_exp_avg_sq_fraction, "exp_avg_sq updates", "the second moment did not move"),
        )
        for kind, fraction, what, how in checks:
            if fraction is None or fraction <= self.threshold:
                self._consecutive[kind] = 0
                continue
            self._consecutive[kind] += 1
            if self._consecutive[kind] < self.patience:
                continue
            verdicts = [check_optimizer(opt) for opt in dict.fromkeys(optimizers)]
            storages = sorted({dtype_name(v.storage_dtype) for v in verdicts})
            cause = f"stale-{kind}:" + ",".join(f"{v.optimizer.name if v.optimizer else '-'}" for v in verdicts)
            worst = ""
            if kind == "update" and report.worst_params:
                worst = (
                    " Worst parameters: "
                    + ", ".join(f"{p.name} ({p.stale_fraction:.0%})" for p in report.worst_params)
                    + "."
                )
            warn_once(
                f"{cause}:{','.join(storages)}",
                f"UpdateUnderflowMonitor: {fraction:.0%} of the sampled {what} rounded away ({how} although the "
                f"optimizer's update was non-zero) for {self._consecutive[kind]} consecutive measurements "
                f"(threshold {self.threshold:g}, storage {'/'.join(storages)}).{worst} {_fix(verdicts)}",
            )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrecisionConfigError(f"UpdateUnderflowMonitor({name}={value!r}) is not valid: use an int >= 1.")
    return value


def _fix(verdicts: list[Verdict]) -> str:
    """The pairing rule's fix for the measured optimizers (the rule decides; this only words the measurement)."""
    for v in verdicts:
        if v.fixes:
            return _format_fixes(v.fixes)
    for v in verdicts:
        if v.message:
            return v.message
    # The rule judged the pairing safe (e.g. Kahan summation), yet updates are lost: a half-precision compensation
    # buffer cannot hold updates below its own resolution. Ask the rule what it prescribes for lost half updates.
    storage = next((v.storage_dtype for v in verdicts if v.storage_dtype in HALF_DTYPES), torch.bfloat16)
    lost = judge(storage, classify_optimizer(torch.optim.AdamW))
    names = ", ".join(v.optimizer.short_name if v.optimizer else "-" for v in verdicts)
    return (
        f"The pairing rule judges {names} with this storage {verdicts[0].status.value!r}, but updates are still lost "
        f"(a half-precision compensation buffer drops updates below its own resolution). If the loss plateaus: "
        f"{_format_fixes(lost.fixes)}"
    )


def _format_fixes(fixes: tuple[str, ...]) -> str:
    if len(fixes) > 1:
        return f"Fix: (1) {fixes[0]}; or (2) {fixes[1]}."
    return f"Fix: {fixes[0]}." if fixes else ""
