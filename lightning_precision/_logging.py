"""The library's logger; info lines go out on rank zero only."""

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

log = logging.getLogger("lightning_precision")


@rank_zero_only
def info_rank_zero(message: str) -> None:
    """Log ``message`` at INFO level on rank zero."""
    log.info(message)
