"""The library's logger and its once-per-cause reporting: info lines and warnings go out on rank zero only."""

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn

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


def warn_once(cause: str, message: str, category: type[Warning] = PrecisionWarning) -> None:
    """Emit a warning (a :class:`PrecisionWarning` unless ``category`` says otherwise) on rank zero, once per cause
    per process."""
    if first_report(cause):
        rank_zero_warn(message, category=category)


def info_once(cause: str, message: str) -> None:
    """Log an info line on rank zero, once per cause per process."""
    if first_report(cause):
        info_rank_zero(message)


def reset_reported() -> None:
    """Forget which causes were reported, so they are reported again (for tests and long-lived notebooks)."""
    _REPORTED_CAUSES.clear()
