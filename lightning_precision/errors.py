"""Warning and error classes of the library, so users can filter or catch exactly these."""


class PrecisionWarning(UserWarning):
    """A precision setup that trains, but worse than it should (e.g. bf16 Adam state).

    Filter it like any warning, e.g. ``warnings.filterwarnings("error", category=PrecisionWarning)``.
    """


class PrecisionPairingError(RuntimeError):
    """Raised under ``on_unsafe="error"`` when parameter storage and optimizer are an unsafe pair."""


class PrecisionConfigError(ValueError):
    """A configuration value that the library cannot act on (names the value and the valid choices)."""


class CheckpointExportError(PrecisionConfigError):
    """A checkpoint that ``export`` cannot read, or an output directory it cannot write (names the path and why)."""


class OptimizerStateError(ValueError):
    """A loaded optimizer state that cannot be used: corrupt (nan, negative second moment, wrong shape) or saved by an
    optimizer whose state cannot be converted. The message names the tensor (parameter index, group, key) or the
    missing keys, and the fix."""
