"""Measures how many optimizer updates round away in the stored parameters and in Adam's second moment.

The trap the pairing rule guards against (half-precision storage updated in place) shows no symptom: the gradient
norm stays sane and the loss plateaus higher. :class:`UpdateUnderflowMonitor` makes it a number.

What is measured, per monitored optimizer step and per trainable parameter, on a fixed sample of its elements:

* **Intended update** ``u``: estimated in fp32 from the optimizer's state after the step (Adam family:
  ``lr * m_hat / (sqrt(v_hat) + eps)`` plus decoupled weight decay; SGD: ``lr * (momentum buffer or gradient)``).
* **Counted** elements: those with ``|u| >= 2**-23 * |p|`` (one fp32 ulp of the parameter or more), i.e. updates
  that fp32 storage would have recorded. This is what "non-zero update" means here, and it decides the zero-gradient
  cases: an element whose gradient is zero this step is still counted when Adam's momentum or decoupled weight decay
  moves it by that much (and that move is lost the same way), but not when its momentum has decayed below fp32
  resolution (dead units) or it never received a gradient and has no weight decay. A parameter without a gradient
  this step is skipped by the optimizer and not measured.
* **Stale** elements: counted elements whose effective value did not change. The effective value is the stored
  value, plus the compensation buffer for optimizers that keep one (Kahan summation: the buffer holds what was not
  written yet, so a deferred update is not a lost one), or the master copy where the optimizer exposes it.
* The second moment likewise: ``exp_avg_sq`` elements whose intended change ``(1 - beta2) * (g**2 - v)`` is at
  least one fp32 ulp of ``v`` but whose stored value did not change.

Half-precision parameters of optimizers that keep master weights or round stochastically without a readable buffer
(e.g. flashoptim's error-correction bits, torchao's stochastic rounding) are not measured: there an unchanged stored
value is not a lost update. Fractions are estimates over the sampled elements, weighted by each tensor's size, and
reduced across ranks with one all-reduce so every rank reports the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_precision._logging import warn_once
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.pairing import (
    OptimizerKind,
    Verdict,
    check_optimizer,
    classify_optimizer,
    judge,
)

METRIC_UPDATE = "precision/stale_update_fraction"
METRIC_EXP_AVG_SQ = "precision/stale_exp_avg_sq_fraction"

# State keys of buffers that hold the part of the update the half-precision parameter did not take (Kahan).
COMPENSATION_KEYS: tuple[str, ...] = ("kahan_comp", "compensation", "kahan_buffer", "comp")
# State keys of full-precision master copies of the parameter (Transformer Engine FusedAdam).
MASTER_KEYS: tuple[str, ...] = ("master_param",)

_FP32_EPS = torch.finfo(torch.float32).eps  # one ulp of fp32 relative to the value (2**-23)
_FP32_TINY = torch.finfo(torch.float32).tiny
# Columns of the per-parameter count rows that are all-reduced across ranks.
_STALE, _COUNTED, _SQ_STALE, _SQ_COUNTED, _SAMPLED, _W_STALE, _W_COUNTED, _W_SQ_STALE, _W_SQ_COUNTED = range(9)
_NUM_COLS = 9


@dataclass(frozen=True)
class ParamStaleness:
    """Stale updates of one parameter at one measurement.

    Attributes:
        name: Parameter name (``named_parameters`` of the LightningModule).
        stale_fraction: Fraction of its counted sampled elements whose update rounded away.
        counted: Sampled elements with an update fp32 would have recorded (summed over ranks).
        sampled: Sampled elements (summed over ranks).
    """

    name: str
    stale_fraction: float
    counted: int
    sampled: int


@dataclass(frozen=True)
class UnderflowReport:
    """One measurement of :class:`UpdateUnderflowMonitor`.

    Attributes:
        step: ``trainer.global_step`` when it was reported.
        stale_update_fraction: Estimated fraction of parameter elements whose update rounded away (``None`` when no
            element had an update to measure).
        stale_exp_avg_sq_fraction: The same for ``exp_avg_sq`` (``None`` for optimizers without one).
        groups: Stale update fraction per parameter group (``"group_0"``, or the group's ``"name"``; prefixed with
            ``"optimizer_<i>/"`` when there are several optimizers).
        exp_avg_sq_groups: Stale ``exp_avg_sq`` fraction per parameter group.
        worst_params: The ``top_k`` parameters with the highest stale update fraction, worst first.
        params: Every measured parameter, in optimizer order.
        unmeasured: Names of half-precision parameters not measured (their optimizer keeps a master copy this
            monitor cannot read) or whose optimizer's update it cannot estimate.
    """

    step: int
    stale_update_fraction: float | None
    stale_exp_avg_sq_fraction: float | None
    groups: dict[str, float] = field(default_factory=dict)
    exp_avg_sq_groups: dict[str, float] = field(default_factory=dict)
    worst_params: tuple[ParamStaleness, ...] = ()
    params: tuple[ParamStaleness, ...] = ()
    unmeasured: tuple[str, ...] = ()

    def metrics(self) -> dict[str, float]:
        """The logged metrics: overall fractions and one key per parameter group."""
        out: dict[str, float] = {}
        if self.stale_update_fraction is not None:
            out[METRIC_UPDATE] = self.stale_update_fraction
            out.update({f"{METRIC_UPDATE}/{g}": v for g, v in self.groups.items()})
        if self.stale_exp_avg_sq_fraction is not None:
            out[METRIC_EXP_AVG_SQ] = self.stale_exp_avg_sq_fraction
            out.update({f"{METRIC_EXP_AVG_SQ}/{g}": v for g, v in self.exp_avg_sq_groups.items()})
        return out


@dataclass
class _Sample:
    """Sampled elements of one parameter taken just before the optimizer step."""

    param: torch.Tensor
    name: str
    group_index: int
    group_label: str
    idx: torch.Tensor
    local_numel: int
    before: torch.Tensor | None = None  # stored value (fp32 copy)
    grad: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    buffer_key: str | None = None
    buffer: torch.Tensor | None = None  # compensation buffer or master copy (fp32 copy), if it existed
    protected: bool = False  # half storage under an optimizer that keeps a master copy or compensates
    skip: str | None = None  # why it is not measured ("" for: no gradient this step)


class UpdateUnderflowMonitor(Callback):
    """Measures the fraction of optimizer updates that round away in the stored parameters.

    Every ``every_n_steps`` optimizer steps it samples up to ``max_elements_per_tensor`` elements of each trainable
    parameter (a fixed-seed index per tensor, the same on every rank; the local shard of a DTensor), snapshots them
    just before the step and compares after it, estimating the update the optimizer intended from its own state.
    See the module docstring for exactly which elements count. It logs ``precision/stale_update_fraction``,
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
        self.seed = int(seed)
        self.latest: UnderflowReport | None = None
        self._handles: list[Any] = []
        self._names: dict[int, str] = {}
        self._indices: dict[int, tuple[int, torch.Tensor]] = {}
        self._steps: dict[int, int] = {}
        self._samples: dict[int, list[_Sample]] = {}
        self._pending: list[tuple[int, torch.optim.Optimizer, list[_Sample], torch.Tensor]] = []
        self._optimizers: list[torch.optim.Optimizer] = []
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
        if metrics:
            for logger in trainer.loggers:  # logged directly: Lightning's log_every_n_steps would drop them
                logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()

    # -- Measuring ------------------------------------------------------------------------------------------------

    def attach(
        self, optimizers: Iterable[torch.optim.Optimizer], named_parameters: Iterable[tuple[str, torch.Tensor]] = ()
    ) -> None:
        """Start measuring ``optimizers`` (done at fit start; public for loops without a Trainer).

        Args:
            optimizers: The optimizers whose steps are measured.
            named_parameters: Names for the parameters, used in reports.
        """
        self.detach()
        self._optimizers = list(optimizers)
        self._names = {id(p): n for n, p in named_parameters}
        self._indices.clear()
        self._steps = {}
        self._consecutive = {"update": 0, "exp_avg_sq": 0}
        for i, optimizer in enumerate(self._optimizers):
            self._handles.append(optimizer.register_step_pre_hook(self._make_pre_hook(i)))
            self._handles.append(optimizer.register_step_post_hook(self._make_post_hook(i)))

    def detach(self) -> None:
        """Stop measuring: remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._samples.clear()
        self._pending.clear()

    def collect(self, step: int = 0) -> UnderflowReport | None:
        """Reduce the measurements taken since the last call across ranks, report them and warn if due.

        Every rank must call it at the same point (it all-reduces when a process group is initialised).

        Args:
            step: Step number recorded in the report.

        Returns:
            The report, or ``None`` when no step was measured since the last call.
        """
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        rows = _all_reduce(torch.cat([r for *_, r in pending]))
        report = self._build_report(step, pending, rows.tolist())
        self.latest = report
        self._maybe_warn(report, [opt for _, opt, _, _ in pending])
        return report

    def _make_pre_hook(self, opt_index: int) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
            count = self._steps.get(opt_index, 0)
            self._steps[opt_index] = count + 1
            if count % self.every_n_steps != 0:
                return None
            closure = kwargs.get("closure", args[0] if args else None)
            if not callable(closure):
                self._samples[opt_index] = self._snapshot(opt_index, optimizer)
                return None

            # Lightning passes a closure that runs forward, backward and gradient clipping inside step(): the
            # gradients this step uses exist only after it ran, so the snapshot is taken then.
            def snapshot_after(*a: Any, **kw: Any) -> Any:
                loss = closure(*a, **kw)
                self._samples[opt_index] = self._snapshot(opt_index, optimizer)
                return loss

            if "closure" in kwargs:
                return args, {**kwargs, "closure": snapshot_after}
            return (snapshot_after, *args[1:]), kwargs

        return hook

    def _make_post_hook(self, opt_index: int) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            samples = self._samples.pop(opt_index, None)
            if samples is not None:
                self._pending.append((opt_index, optimizer, samples, self._measure(optimizer, samples)))

        return hook

    @torch.no_grad()
    def _snapshot(self, opt_index: int, optimizer: torch.optim.Optimizer) -> list[_Sample]:
        info = classify_optimizer(optimizer)
        protected = info.kind in (OptimizerKind.KEEPS_MASTER, OptimizerKind.COMPENSATED)
        samples = []
        position = 0
        for gi, group in enumerate(optimizer.param_groups):
            label = _group_label(group, gi, opt_index, len(self._optimizers))
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                name = self._names.get(id(p), f"optimizer_{opt_index}.group_{gi}.param_{position}")
                local = _local(p)
                idx = self._sample_index(p, local, opt_index, position)
                position += 1
                sample = _Sample(p, name, gi, label, idx, local.numel())
                samples.append(sample)
                if p.grad is None:  # the optimizer skips it: nothing intended, nothing to measure
                    sample.skip = ""
                    continue
                state = optimizer.state.get(p) or {}
                if p.dtype in HALF_DTYPES and protected:
                    sample.protected = True
                    # Before the first step the buffer does not exist yet; it is looked up after the step.
                    sample.buffer_key = _buffer_key(state, p, info.kind) if state else None
                    if state and sample.buffer_key is None:
                        sample.skip = f"{info.short_name} keeps a master copy or rounds stochastically"
                        continue
                sample.before = _take(local, idx)
                sample.grad = _take(_local(p.grad), idx)
                if sample.buffer_key is not None:
                    sample.buffer = _take(_local(state[sample.buffer_key]), idx)
                sq = state.get("exp_avg_sq")
                if isinstance(sq, torch.Tensor):
                    sample.exp_avg_sq = _take(_local(sq), idx)
        return samples

    def _sample_index(self, p: torch.Tensor, local: torch.Tensor, opt_index: int, position: int) -> torch.Tensor:
        numel = local.numel()
        cached = self._indices.get(id(p))
        if cached is not None and cached[0] == numel:
            return cached[1]
        idx = sample_indices(
            numel, self.max_elements_per_tensor, seed=self.seed * 1_000_003 + opt_index * 10_007 + position
        )
        idx = idx.to(local.device)
        self._indices[id(p)] = (numel, idx)
        return idx

    @torch.no_grad()
    def _measure(self, optimizer: torch.optim.Optimizer, samples: list[_Sample]) -> torch.Tensor:
        """One row of counts per sample (see the ``_STALE``... columns), on the parameters' device."""
        device = next((s.idx.device for s in samples), torch.device("cpu"))
        rows = torch.zeros(len(samples), _NUM_COLS, dtype=torch.float64, device=device)
        for i, s in enumerate(samples):
            if s.before is None:
                continue
            group = optimizer.param_groups[s.group_index]
            state = optimizer.state.get(s.param) or {}
            estimate = _intended(optimizer, group, state, s)
            if estimate is None:
                s.skip = f"cannot estimate the update of {type(optimizer).__name__}"
                continue
            update, sq_change = estimate
            after = _take(_local(s.param), s.idx)
            key = s.buffer_key or (
                _buffer_key(state, s.param, classify_optimizer(optimizer).kind) if s.protected else None
            )
            if s.protected and key is None:
                s.skip = f"{type(optimizer).__name__} keeps a master copy or rounds stochastically"
                continue
            if key is not None:  # the effective value: what is stored plus what is held back, or the master copy
                buffer_after = _take(_local(state[key]), s.idx)
                if key in MASTER_KEYS:
                    changed = buffer_after != (s.buffer if s.buffer is not None else s.before)
                else:
                    before = s.before.double() + (s.buffer.double() if s.buffer is not None else 0.0)
                    changed = (after.double() + buffer_after.double()) != before
            else:
                changed = after != s.before
            counted = update.abs() >= _FP32_EPS * s.before.abs().clamp_min(_FP32_TINY)
            stale = counted & ~changed
            weight = s.local_numel / max(s.idx.numel(), 1)  # scales the sample up to the tensor
            rows[i, _STALE] = stale.sum()
            rows[i, _COUNTED] = counted.sum()
            rows[i, _SAMPLED] = s.idx.numel()
            sq = state.get("exp_avg_sq")
            if sq_change is not None and isinstance(sq, torch.Tensor):
                v_before = s.exp_avg_sq if s.exp_avg_sq is not None else torch.zeros_like(sq_change)
                v_after = _take(_local(sq), s.idx)
                sq_counted = sq_change.abs() >= _FP32_EPS * v_before.abs().clamp_min(_FP32_TINY)
                rows[i, _SQ_STALE] = (sq_counted & (v_after == v_before)).sum()
                rows[i, _SQ_COUNTED] = sq_counted.sum()
            rows[i, _W_STALE : _W_SQ_COUNTED + 1] = rows[i, _STALE : _SQ_COUNTED + 1] * weight
        return rows

    # -- Reporting ------------------------------------------------------------------------------------------------

    def _build_report(
        self, step: int, pending: list[tuple[int, torch.optim.Optimizer, list[_Sample], torch.Tensor]], rows: list
    ) -> UnderflowReport:
        samples = [s for _, _, batch, _ in pending for s in batch]
        groups: dict[str, list[float]] = {}
        params = []
        total = [0.0] * _NUM_COLS
        for s, row in zip(samples, rows):
            acc = groups.setdefault(s.group_label, [0.0] * _NUM_COLS)
            for c in range(_NUM_COLS):
                acc[c] += row[c]
                total[c] += row[c]
            if row[_COUNTED] > 0:
                params.append(
                    ParamStaleness(s.name, row[_STALE] / row[_COUNTED], int(row[_COUNTED]), int(row[_SAMPLED]))
                )
        worst = sorted(params, key=lambda p: (-p.stale_fraction, -p.counted))[: self.top_k]
        return UnderflowReport(
            step=step,
            stale_update_fraction=_ratio(total[_W_STALE], total[_W_COUNTED]),
            stale_exp_avg_sq_fraction=_ratio(total[_W_SQ_STALE], total[_W_SQ_COUNTED]),
            groups={g: r for g, acc in groups.items() if (r := _ratio(acc[_W_STALE], acc[_W_COUNTED])) is not None},
            exp_avg_sq_groups={
                g: r for g, acc in groups.items() if (r := _ratio(acc[_W_SQ_STALE], acc[_W_SQ_COUNTED])) is not None
            },
            worst_params=tuple(worst),
            params=tuple(params),
            unmeasured=tuple(dict.fromkeys(s.name for s in samples if s.skip)),
        )

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


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def sample_indices(numel: int, max_elements: int, seed: int = 0) -> torch.Tensor:
    """Sorted, distinct flat indices of at most ``max_elements`` elements of a tensor with ``numel`` elements.

    All indices when ``numel <= max_elements``; otherwise one index drawn in each of ``max_elements`` equal strata,
    which covers the whole tensor and needs memory for the sample only. Deterministic in ``seed`` (no rank enters it).
    """
    if numel <= max_elements:
        return torch.arange(numel)
    generator = torch.Generator().manual_seed(seed)
    bounds = (torch.arange(max_elements + 1, dtype=torch.float64) * (numel / max_elements)).floor().long()
    bounds[-1] = numel
    widths = bounds[1:] - bounds[:-1]
    offsets = (torch.rand(max_elements, generator=generator, dtype=torch.float64) * widths).floor().long()
    return bounds[:-1] + offsets.clamp_max(widths - 1)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrecisionConfigError(f"UpdateUnderflowMonitor({name}={value!r}) is not valid: use an int >= 1.")
    return value


def _local(t: Any) -> Any:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of the sampled elements (``torch.take`` reads any layout as if flat, without copying it)."""
    t = getattr(t, "data", t).detach()  # flashoptim wraps its state tensors
    if t.is_contiguous():  # index_select on the flat view is the faster gather
        return t.view(-1).index_select(0, idx).float()
    return torch.take(t, idx).float()


def _group_label(group: dict[str, Any], index: int, opt_index: int, num_optimizers: int) -> str:
    label = str(group["name"]) if isinstance(group.get("name"), str) else f"group_{index}"
    return f"optimizer_{opt_index}/{label}" if num_optimizers > 1 else label


def _buffer_key(state: dict[str, Any], p: torch.Tensor, kind: OptimizerKind) -> str | None:
    """State key of the compensation buffer or master copy for ``p``; ``None`` when the optimizer exposes none."""
    keys = MASTER_KEYS + COMPENSATION_KEYS if kind is OptimizerKind.KEEPS_MASTER else COMPENSATION_KEYS + MASTER_KEYS
    for key in keys:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            return key
    return None


def _scalar(value: Any) -> float:
    return float(_local(value)) if isinstance(value, torch.Tensor) else float(value)


def _intended(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any], s: _Sample
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The update the optimizer intended for the sampled elements, and the intended change of ``exp_avg_sq``.

    Estimated from the state after the step. Only its size matters (it decides whether fp32 would have recorded
    the update), so the Adam formula serves the Adam variants (NAdam, RAdam, ...) too.
    """
    lr = _scalar(group.get("lr", 0.0))
    wd = _scalar(group.get("weight_decay", 0.0) or 0.0)
    p, grad = s.before, s.grad
    assert p is not None and grad is not None
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    if isinstance(exp_avg, torch.Tensor) and isinstance(exp_avg_sq, torch.Tensor) and "eps" in group:
        m = _take(_local(exp_avg), s.idx)
        v_key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        v = _take(_local(state[v_key]), s.idx)
        eps = _scalar(group["eps"])
        debiased = type(optimizer).__module__.startswith("optimi.")  # optimi keeps debiased moments
        if debiased:
            beta2 = _scalar(group.get("beta2", 0.999))
            t = max(_scalar(group.get("step", state.get("step", 1))), 1.0)
            update = lr * m / (v.sqrt() + eps)
            beta2_comp = 1.0 - (beta2**t - beta2) / (beta2**t - 1.0) if t > 1 else 1.0
            decoupled = bool(group.get("decouple_wd") or group.get("decouple_lr"))
            if group.get("decouple_lr") and group.get("max_lr"):
                wd_step = wd * lr / _scalar(group["max_lr"])
            else:
                wd_step = lr * wd
        else:
            beta1, beta2 = (
                _scalar(b) for b in group.get("betas", (group.get("beta1", 0.9), group.get("beta2", 0.999)))
            )
            t = max(_scalar(state.get("step", group.get("step", 1))), 1.0)
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            update = (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
            beta2_comp = 1.0 - beta2
            # torch.optim.AdamW, lightning_precision CompensatedAdamW and other "*AdamW" decay decoupled from the gradient.
            decoupled = bool(group.get("decoupled_weight_decay")) or type(optimizer).__name__.lower().endswith("adamw")
            wd_step = lr * wd
        if wd and decoupled:
            update = update + wd_step * p
        g = grad + wd * p if wd and not decoupled else grad  # L2 weight decay enters the gradient
        v_before = s.exp_avg_sq if s.exp_avg_sq is not None else torch.zeros_like(g)
        return update, beta2_comp * (g * g - v_before)
    if isinstance(optimizer, torch.optim.SGD):
        g = grad + wd * p if wd else grad
        momentum = _scalar(group.get("momentum", 0.0) or 0.0)
        buf = state.get("momentum_buffer")
        if momentum and isinstance(buf, torch.Tensor):
            b = _take(_local(buf), s.idx)
            return lr * (g + momentum * b if group.get("nesterov") else b), None
        return lr * g, None
    return None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _all_reduce(rows: torch.Tensor) -> torch.Tensor:
    """Sum the count rows over ranks so every rank reports the same fractions; no-op without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    backend = str(torch.distributed.get_backend()).lower()
    on_host = rows.device.type == "cpu" or "nccl" not in backend  # gloo reduces host tensors
    buffer = rows.cpu() if on_host and rows.device.type != "cpu" else rows
    torch.distributed.all_reduce(buffer)
    return buffer


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
