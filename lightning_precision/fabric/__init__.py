"""Lightning Fabric: the library's precision plugins for ``Fabric(plugins=[...])``, the pairing check for hand-written
loops (:func:`check`), and a ``parallelize_fn`` for Fabric's ``ModelParallelStrategy`` (:func:`fsdp2_parallelize`)."""

from lightning_precision.fabric.check import check
from lightning_precision.fabric.flash import FlashPrecision
from lightning_precision.fabric.fsdp2 import FSDP2Parallelize, fsdp2_parallelize
from lightning_precision.fabric.half_audio import HalfPrecisionForAudio
from lightning_precision.fabric.mixed import CheckedMixedPrecision

__all__ = [
    "CheckedMixedPrecision",
    "FSDP2Parallelize",
    "FlashPrecision",
    "HalfPrecisionForAudio",
    "check",
    "fsdp2_parallelize",
]
