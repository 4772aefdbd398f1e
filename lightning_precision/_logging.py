"""The library's logger and its once-per-cause reporting: info lines and warnings go out on rank zero only."""

import importlib.util
import logging
import os
import sys
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_precision.errors import PrecisionWarning

log = logging.getLogger("lightning_precision")
# Visible by default, as Lightning's own INFO lines are (it configures "lightning.pytorch" the same way): a plain
# script or LightningCLI has no logging set up. Where the application configured logging (Hydra, a root handler),
# records propagate to it instead. Silence with logging.getLogger("lightning_precision").setLevel(logging.WARNING).
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False

_REPORTED_CAUSES: set[str] = set()


@rank_zero_only
def info_rank_zero(message: str) -> None:
    """Log ``message`` at INFO level on rank zero."""
    log.info(message)


def first_report(cause: str) -> bool:
    """Whether ``cause`` is reported for the first time in this process (and remember it)."""
    if cause in _REPORTED_CAUSES:
        return False
    _REPORTED_CAUSES.add(cause)
    return True


# Frames in these packages are not the user's: a warning points at the first frame outside them (the user's
# ``trainer.fit(...)``, ``resolve_trainer_cfg(...)``, plugin construction or ``LightningCLI(...)`` call), not at this
# library, the frameworks or the config tools that instantiate its classes from a YAML.
_NOT_USER_PACKAGES = (
    "lightning_precision", "lightning", "pytorch_lightning", "lightning_fabric", "torch", "jsonargparse", "hydra",
    "omegaconf",
)  # fmt: skip


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) + os.sep if spec is not None and spec.origin else None


_LIBRARY_DIRS = tuple(d for d in map(_package_dir, _NOT_USER_PACKAGES) if d)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside the packages above (and importlib's frozen frames), seen from
    ``warn_once``."""
    frame, level = sys._getframe(2), 2  # the caller of warn_once is level 2 for warnings.warn inside it
    while frame is not None and frame.f_code.co_filename.startswith((*_LIBRARY_DIRS, "<frozen ")):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def warn_once(cause: str, message: str, category: type[Warning] = PrecisionWarning) -> None:
    """Emit a warning (a :class:`PrecisionWarning` unless ``category`` says otherwise) on rank zero, once per cause
    per process, attributed to the user's code that led to it."""
    if first_report(cause) and rank_zero_only.rank == 0:
        warnings.warn(message, category=category, stacklevel=_user_stacklevel())


def info_once(cause: str, message: str) -> None:
    """Log an info line on rank zero, once per cause per process."""
    if first_report(cause):
        info_rank_zero(message)


def reset_reported() -> None:
    """Forget which causes were reported, so they are reported again (for tests and long-lived notebooks)."""
    _REPORTED_CAUSES.clear()
