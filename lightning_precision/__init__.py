"""lightning_precision: mixed-precision training in PyTorch Lightning that is correct by default.

The pairing rule (:mod:`lightning_precision.pairing`) decides which parameter storage dtype is safe with which
optimizer; the plugins, the config helper and the runtime guard all ask it.
"""

from lightning_precision.callbacks import PrecisionGuard, UpdateUnderflowMonitor
from lightning_precision.casting import cast_batch
from lightning_precision.config import TrainerKwargs, resolve_trainer_cfg
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError, PrecisionWarning
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.optim import CompensatedAdamW
from lightning_precision.pairing import (
    OptimizerInfo,
    OptimizerKind,
    Status,
    Verdict,
    check_optimizer,
    classify_optimizer,
    judge,
    resolve_storage_dtype,
)
from lightning_precision.plugins import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio
from lightning_precision.report import PrecisionContract, read_precision_contract
from lightning_precision.strategies import FSDP2Strategy  # registers Trainer(strategy="fsdp2")

__version__ = "0.1.0"

__all__ = [
    "CheckedMixedPrecision",
    "CompensatedAdamW",
    "FSDP2Strategy",
    "FlashPrecision",
    "HalfPrecisionForAudio",
    "OptimizerInfo",
    "OptimizerKind",
    "PrecisionConfigError",
    "PrecisionContract",
    "PrecisionGuard",
    "PrecisionMode",
    "PrecisionPairingError",
    "PrecisionWarning",
    "Status",
    "TrainerKwargs",
    "UpdateUnderflowMonitor",
    "Verdict",
    "cast_batch",
    "check_optimizer",
    "classify_optimizer",
    "get_mode",
    "judge",
    "parse_dtype",
    "read_precision_contract",
    "resolve_storage_dtype",
    "resolve_trainer_cfg",
]
