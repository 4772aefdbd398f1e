"""Callbacks that check and report the precision setup while training."""

from lightning_precision.callbacks.guard import PrecisionGuard
from lightning_precision.callbacks.underflow import UnderflowReport, UpdateUnderflowMonitor

__all__ = ["PrecisionGuard", "UnderflowReport", "UpdateUnderflowMonitor"]
