"""The update-underflow meter: framework-free measurement of how many optimizer updates round away.

The trap the pairing rule guards against (half-precision storage updated in place) shows no symptom: the gradient
norm stays sane and the loss plateaus higher. :class:`UnderflowMeter` makes it a number; the Lightning callback
:class:`~lightning_precision.callbacks.UpdateUnderflowMonitor` runs it in a Trainer.

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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision.catalogue import MASTER_KEYS, OptimizerInfo, OptimizerKind, classify_optimizer
from lightning_precision.dtypes import HALF_DTYPES
from lightning_precision.optim._dtensor import local_tensor
from lightning_precision.underflow.intended_update import intended_update, take
from lightning_precision.underflow.report import ParamStaleness, UnderflowReport

_FP32_EPS = torch.finfo(torch.float32).eps  # one ulp of fp32 relative to the value (2**-23)
_FP32_TINY = torch.finfo(torch.float32).tiny
# Columns of the per-parameter count rows that are all-reduced across ranks.
_STALE, _COUNTED, _SQ_STALE, _SQ_COUNTED, _SAMPLED, _W_STALE, _W_COUNTED, _W_SQ_STALE, _W_SQ_COUNTED = range(9)
_NUM_COLS = 9


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


class UnderflowMeter:
    """Samples parameters around optimizer steps and counts the updates that rounded away.

    Every ``every_n_steps`` optimizer steps it samples up to ``max_elements_per_tensor`` elements of each trainable
    parameter (a fixed-seed index per tensor, the same on every rank; the local shard of a DTensor), snapshots them
    just before the step and compares after it, estimating the update the optimizer intended from its own state (see
    the module docstring for exactly which elements count). Usable in any loop: :meth:`attach`, step, :meth:`collect`.

    Args:
        every_n_steps: Measure every this many optimizer steps (per optimizer), starting with the first.
        max_elements_per_tensor: Elements sampled per parameter tensor (per rank); bounds the cost.
        top_k: Worst parameters kept in :attr:`UnderflowReport.worst_params`.
        seed: Seed of the sampled indices.

    Attributes:
        latest: The latest report, ``None`` before the first.
        measured_optimizers: The optimizers the latest report measured (until :meth:`detach`).
    """

    def __init__(self, every_n_steps: int = 50, max_elements_per_tensor: int = 4096, top_k: int = 5, seed: int = 0):
        self.every_n_steps = every_n_steps
        self.max_elements_per_tensor = max_elements_per_tensor
        self.top_k = top_k
        self.seed = int(seed)
        self.latest: UnderflowReport | None = None
        self.measured_optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._names: dict[int, str] = {}
        self._indices: dict[int, tuple[int, torch.Tensor]] = {}
        self._steps: dict[int, int] = {}
        self._samples: dict[int, list[_Sample]] = {}
        self._pending: list[tuple[int, torch.optim.Optimizer, list[_Sample], torch.Tensor]] = []
        self._optimizers: list[torch.optim.Optimizer] = []

    def attach(
        self, optimizers: Iterable[torch.optim.Optimizer], named_parameters: Iterable[tuple[str, torch.Tensor]] = ()
    ) -> None:
        """Start measuring ``optimizers``.

        Args:
            optimizers: The optimizers whose steps are measured.
            named_parameters: Names for the parameters, used in reports.
        """
        self.detach()
        self._optimizers = list(optimizers)
        self._names = {id(p): n for n, p in named_parameters}
        for i, optimizer in enumerate(self._optimizers):
            self._handles.append(optimizer.register_step_pre_hook(self._make_pre_hook(i)))
            self._handles.append(optimizer.register_step_post_hook(self._make_post_hook(i)))

    def detach(self) -> None:
        """Stop measuring: remove the optimizer hooks and forget the optimizers and parameters (:attr:`latest` is
        kept), so a finished run's optimizer state is not held alive until the next :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._samples.clear()
        self._pending.clear()
        self._optimizers = []
        self.measured_optimizers = []
        self._names = {}
        self._indices.clear()
        self._steps = {}

    def collect(self, step: int = 0) -> UnderflowReport | None:
        """Reduce the measurements taken since the last call across ranks and report them.

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
        self.measured_optimizers = list(dict.fromkeys(opt for _, opt, _, _ in pending))
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
                shard = local_tensor(p)
                idx = self._sample_index(p, shard, opt_index, position)
                position += 1
                sample = _Sample(p, name, gi, label, idx, shard.numel())
                samples.append(sample)
                if p.grad is None:  # the optimizer skips it: nothing intended, nothing to measure
                    sample.skip = ""
                    continue
                state = optimizer.state.get(p) or {}
                if p.dtype in HALF_DTYPES and protected:
                    sample.protected = True
                    # Before the first step the buffer does not exist yet; it is looked up after the step.
                    sample.buffer_key = _buffer_key(state, p, info) if state else None
                    if state and sample.buffer_key is None:
                        sample.skip = f"{info.short_name} keeps a master copy or rounds stochastically"
                        continue
                sample.before = take(shard, idx)
                sample.grad = take(local_tensor(p.grad), idx)
                if sample.buffer_key is not None:
                    sample.buffer = take(local_tensor(state[sample.buffer_key]), idx)
                sq = state.get("exp_avg_sq")
                if isinstance(sq, torch.Tensor):
                    sample.exp_avg_sq = take(local_tensor(sq), idx)
        return samples

    def _sample_index(self, p: torch.Tensor, shard: torch.Tensor, opt_index: int, position: int) -> torch.Tensor:
        numel = shard.numel()
        cached = self._indices.get(id(p))
        if cached is not None and cached[0] == numel:
            return cached[1]
        idx = sample_indices(
            numel, self.max_elements_per_tensor, seed=self.seed * 1_000_003 + opt_index * 10_007 + position
        )
        idx = idx.to(shard.device)
        self._indices[id(p)] = (numel, idx)
        return idx

    @torch.no_grad()
    def _measure(self, optimizer: torch.optim.Optimizer, samples: list[_Sample]) -> torch.Tensor:
        """One row of counts per sample (see the ``_STALE``... columns), on the parameters' device."""
        info = classify_optimizer(optimizer)
        device = next((s.idx.device for s in samples), torch.device("cpu"))
        rows = torch.zeros(len(samples), _NUM_COLS, dtype=torch.float64, device=device)
        for i, s in enumerate(samples):
            if s.before is None:
                continue
            group = optimizer.param_groups[s.group_index]
            state = optimizer.state.get(s.param) or {}
            estimate = intended_update(info, group, state, s.idx, s.before, s.grad, s.exp_avg_sq)
            if estimate is None:
                s.skip = f"cannot estimate the update of {type(optimizer).__name__}"
                continue
            update, sq_change = estimate
            after = take(local_tensor(s.param), s.idx)
            key = s.buffer_key or (_buffer_key(state, s.param, info) if s.protected else None)
            if s.protected and key is None:
                s.skip = f"{type(optimizer).__name__} keeps a master copy or rounds stochastically"
                continue
            if key is not None:  # the effective value: what is stored plus what is held back, or the master copy
                buffer_after = take(local_tensor(state[key]), s.idx)
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
                v_after = take(local_tensor(sq), s.idx)
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


def _group_label(group: dict[str, Any], index: int, opt_index: int, num_optimizers: int) -> str:
    label = str(group["name"]) if isinstance(group.get("name"), str) else f"group_{index}"
    return f"optimizer_{opt_index}/{label}" if num_optimizers > 1 else label


def _buffer_key(state: dict[str, Any], p: torch.Tensor, info: OptimizerInfo) -> str | None:
    """State key of the compensation buffer or master copy for ``p``; ``None`` when the optimizer exposes none."""
    for key in info.buffer_keys:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            return key
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
