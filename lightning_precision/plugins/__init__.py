"""Precision plugins for ``pl.Trainer(plugins=[...])`` and LightningCLI ``class_path``."""

from lightning_precision.plugins.flash import FlashPrecision
from lightning_precision.plugins.half_audio import HalfPrecisionForAudio
from lightning_precision.plugins.mixed import CheckedMixedPrecision

__all__ = ["CheckedMixedPrecision", "FlashPrecision", "HalfPrecisionForAudio"]
