"""Strategies. Importing this package registers ``"fsdp2"`` in Lightning's StrategyRegistry."""

from lightning_precision.strategies.fsdp2 import FSDP2Precision, FSDP2Strategy, resolve_fsdp2_precision
from lightning_precision.strategies.parallelize import parallelize, select_blocks

__all__ = ["FSDP2Precision", "FSDP2Strategy", "parallelize", "resolve_fsdp2_precision", "select_blocks"]
