"""lightning_precision: mixed-precision training in PyTorch Lightning that is correct by default.

Each decision has one home: what an optimizer keeps (:mod:`~lightning_precision.catalogue`), which storage dtype is
safe with it (:mod:`~lightning_precision.pairing`), which storage dtype a run uses (:mod:`~lightning_precision.storage`),
what an unsafe pairing does (:mod:`~lightning_precision.policy`) and what each precision string means
(:mod:`~lightning_precision.modes`). The plugins, the strategy, the config helper and the runtime guard all ask them.
"""

from lightning_precision.callbacks import PrecisionGuard, UpdateUnderflowMonitor
from lightning_precision.casting import cast_batch
from lightning_precision.catalogue import OptimizerInfo, OptimizerKind, classify_optimizer
from lightning_precision.checkpoint_io import AtomicCheckpointIO
from lightning_precision.config import TrainerKwargs, plan_trainer_cfg, resolve_trainer_cfg
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import (
    CheckpointExportError,
    PrecisionConfigError,
    PrecisionPairingError,
    PrecisionWarning,
)
from lightning_precision.export import ExportResult, export_weights
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.optim import CompensatedAdamW
from lightning_precision.pairing import Status, Verdict, check_optimizer, judge
from lightning_precision.plugins import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio
from lightning_precision.report import PrecisionContract, read_precision_contract
from lightning_precision.storage import StorageDecision, decide_storage, resolve_storage_dtype
from lightning_precision.strategies import FSDP2Strategy  # registers Trainer(strategy="fsdp2")

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CheckedMixedPrecision",
    "CheckpointExportError",
    "CompensatedAdamW",
    "ExportResult",
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
    "StorageDecision",
    "TrainerKwargs",
    "UpdateUnderflowMonitor",
    "Verdict",
    "cast_batch",
    "check_optimizer",
    "classify_optimizer",
    "decide_storage",
    "export_weights",
    "get_mode",
    "judge",
    "parse_dtype",
    "plan_trainer_cfg",
    "read_precision_contract",
    "resolve_storage_dtype",
    "resolve_trainer_cfg",
]
