"""Callbacks that check and report the precision setup while training."""

from lightning_precision.callbacks.guard import PrecisionGuard

__all__ = ["PrecisionGuard"]
