"""Lightning's ``*-mixed`` precision plugin under FSDP2: the ``MixedPrecisionPolicy`` casts, so ``torch.autocast`` is
turned off unless asked for."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from typing_extensions import override

from lightning_precision._logging import info_rank_zero


class _PolicyMixedPrecision(MixedPrecision):
    """Lightning's mixed precision without ``torch.autocast``: FSDP2's policy already runs the blocks in half
    precision, and autocast on top would re-cast every matmul's inputs a second time. The gradient scaler (fp16) is
    kept."""

    @override
    def forward_context(self) -> AbstractContextManager:
        return nullcontext()


def without_autocast(plugin: Precision, where: str) -> Precision:
    """Lightning's ``*-mixed`` plugin with its ``torch.autocast`` off (any other plugin as it is): under FSDP2 the
    ``MixedPrecisionPolicy`` casts, and autocast on top would re-cast every matmul's inputs."""
    if type(plugin) is not MixedPrecision:
        return plugin
    # Lightning printed "Using bfloat16 Automatic Mixed Precision (AMP)" when it built the plugin: say what runs.
    info_rank_zero(
        f"{where}: Lightning's 'Automatic Mixed Precision (AMP)' line names the plugin it built for "
        f"precision={plugin.precision!r}; under FSDP2 its torch.autocast is off (autocast=False): the "
        "MixedPrecisionPolicy computes in the half dtype from the stored shards (the contract shows the dtypes)."
    )
    return _PolicyMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
