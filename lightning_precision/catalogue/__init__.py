"""The optimizer catalogue: the one place that knows what each optimizer family keeps.

Everything the library needs to know about an optimizer is answered here, from an instance, a class, an import path
or a ``_target_``/``class_path`` config alike (the same answer for each):

* its classification (:class:`OptimizerKind`): whether its state follows the parameter dtype, it keeps master weights
  or error-correction bits, or it compensates its parameter write;
* its settings (constructor defaults under the config's or the instance's values);
* the dtype of each state tensor it keeps for a parameter of a given storage dtype, and how to read its state tensors
  (flashoptim wraps them);
* its bytes per parameter, part by part;
* what the update-underflow monitor needs to reconstruct its intended update (which formula, where a compensation
  buffer or master copy lives).

The pairing rule (:mod:`lightning_precision.pairing`), the memory estimate, the monitor and the precision contract ask
this package. Adding an optimizer family is one entry in ``families._FAMILIES`` plus its tests.
"""

from lightning_precision.catalogue.families import classify_optimizer
from lightning_precision.catalogue.info import (
    COMPENSATION_KEYS,
    FLASH_QUANTIZED_MOMENT_BYTES,
    MASTER_KEYS,
    OptimizerInfo,
    OptimizerKind,
    UpdateFormula,
)
from lightning_precision.catalogue.state import (
    observed_moment_dtypes,
    observed_second_moment_dtype,
    state_storage_tensors,
    state_tensor,
)

__all__ = [
    "COMPENSATION_KEYS",
    "FLASH_QUANTIZED_MOMENT_BYTES",
    "MASTER_KEYS",
    "OptimizerInfo",
    "OptimizerKind",
    "UpdateFormula",
    "classify_optimizer",
    "observed_moment_dtypes",
    "observed_second_moment_dtype",
    "state_storage_tensors",
    "state_tensor",
]
