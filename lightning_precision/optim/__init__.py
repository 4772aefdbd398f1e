"""Optimizers for low-precision parameters."""

from lightning_precision.optim.compensated_adamw import CompensatedAdamW

__all__ = ["CompensatedAdamW"]
