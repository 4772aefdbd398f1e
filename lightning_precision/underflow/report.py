"""What one measurement of the update-underflow meter says: fractions overall, per group and per parameter."""

from __future__ import annotations

from dataclasses import dataclass, field

METRIC_UPDATE = "precision/stale_update_fraction"
METRIC_EXP_AVG_SQ = "precision/stale_exp_avg_sq_fraction"


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
