"""Precision plugins for ``pl.Trainer(plugins=[...])`` and LightningCLI ``class_path``."""

from lightning_precision.plugins.flash import FlashPrecision
from lightning_precision.plugins.half_audio import HalfPrecisionForAudio

__all__ = ["FlashPrecision", "HalfPrecisionForAudio"]
