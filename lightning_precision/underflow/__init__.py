"""Measuring how many optimizer updates round away (framework-free); the Lightning callback is
:class:`~lightning_precision.callbacks.UpdateUnderflowMonitor`."""

from lightning_precision.underflow.meter import UnderflowMeter, sample_indices
from lightning_precision.underflow.report import METRIC_EXP_AVG_SQ, METRIC_UPDATE, ParamStaleness, UnderflowReport

__all__ = [
    "METRIC_EXP_AVG_SQ",
    "METRIC_UPDATE",
    "ParamStaleness",
    "UnderflowMeter",
    "UnderflowReport",
    "sample_indices",
]
