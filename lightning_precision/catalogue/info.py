"""What the catalogue says about one optimizer: its kind, and the dtypes and bytes of the state it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch

from lightning_precision.dtypes import HALF_DTYPES, dtype_name

# flashoptim quantizes each moment to int8 with one fp16 scale per group of 32 elements (CUDA only).
FLASH_QUANT_GROUP_SIZE = 32
FLASH_QUANTIZED_MOMENT_BYTES = 1 + 2 / FLASH_QUANT_GROUP_SIZE
QUANTIZED_MOMENT_TEXT = "int8+scales (CUDA)"

# State keys of buffers that hold the part of the update the half-precision parameter did not take (Kahan).
COMPENSATION_KEYS: tuple[str, ...] = ("kahan_comp", "compensation", "kahan_buffer", "comp")
# State keys of full-precision master copies of the parameter (Transformer Engine FusedAdam).
MASTER_KEYS: tuple[str, ...] = ("master_param",)

UpdateFormula = Literal["adam", "adam-debiased", "sgd"]


class OptimizerKind(str, Enum):
    """What an optimizer keeps, which decides whether half storage is safe with it."""

    STATE_FOLLOWS_PARAM = "state follows parameter dtype"
    KEEPS_MASTER = "keeps master weights / error-correction bits"
    COMPENSATED = "compensated parameter update"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer classified by what it really keeps.

    Attributes:
        name: Import path of the optimizer class, e.g. ``"torch.optim.adamw.AdamW"``.
        kind: What it keeps (see :class:`OptimizerKind`).
        reason: One sentence on why it was classified so.
        is_adam: Whether it is an Adam-family optimizer (an EMA state with ``betas``).
        beta2: Second-moment decay, where known.
        exp_avg_sq_dtype: Dtype of the second moment if fixed by the optimizer, ``None`` if it follows the
            parameter dtype.
        master_bytes: Extra bytes per half-precision parameter it keeps for master weights or error correction.
        master_label: What those bytes are, in words (``"fp32 master remainders (16 low bits)"``); empty: the
            family's default wording.
        compensation_buffer: Whether it keeps a compensation buffer in the parameter dtype (Kahan summation).
        moments: The state tensors it keeps per parameter, by state key (``("exp_avg", "exp_avg_sq")`` for Adam,
            ``("momentum_buffer",)`` for SGD with momentum); empty when none or not known.
        moment_dtypes: ``(state key, dtype)`` for moments whose dtype the optimizer fixes for half parameters (e.g.
            ``CompensatedAdamW(exp_avg_dtype=...)``); the others follow the parameter dtype.
        moment_dtypes_for_all: Whether ``moment_dtypes`` hold for full-precision parameters too (AnyPrecisionAdamW's
            ``variance_dtype`` applies to every parameter).
        stochastic_moments: Moments whose half-precision storage is written with stochastic rounding (unbiased, so a
            bf16 second moment still decays at ``beta2=0.999``), e.g. ``CompensatedAdamW(exp_avg_sq_rounding=...)``.
        quantized_moments: Whether its moments are stored quantized (flashoptim's int8 plus scales, CUDA).
        update_formula: The update the underflow monitor reconstructs (``None``: it cannot).
        decoupled_weight_decay: Whether weight decay is applied to the parameter rather than the gradient.
        decoupled_keys: Parameter-group keys that switch decoupled weight decay on for one group.
        step_temporaries: What the optimizer step allocates on top of the steady state, per parameter, as
            ``(copies of the parameters in their dtype, extra bytes)``: torch's foreach step makes one copy, its fused
            step none, ``CompensatedAdamW``'s chunked step at most 0.375 bytes. ``None``: not known.
        step_temporaries_on_cpu: The same for CPU parameters, where it differs (torch's default step is the
            per-tensor loop there, the multi-tensor one on accelerators).
    """

    name: str
    kind: OptimizerKind
    reason: str
    is_adam: bool = False
    beta2: float | None = None
    exp_avg_sq_dtype: torch.dtype | None = None
    master_bytes: int = 0
    master_label: str = ""
    compensation_buffer: bool = False
    moments: tuple[str, ...] = ()
    moment_dtypes: tuple[tuple[str, torch.dtype], ...] = ()
    moment_dtypes_for_all: bool = False
    stochastic_moments: tuple[str, ...] = ()
    quantized_moments: bool = False
    update_formula: UpdateFormula | None = None
    decoupled_weight_decay: bool = False
    decoupled_keys: tuple[str, ...] = ("decoupled_weight_decay",)
    step_temporaries: tuple[float, float] | None = None
    step_temporaries_on_cpu: tuple[float, float] | None = None

    @property
    def short_name(self) -> str:
        """Class name without the module path."""
        return self.name.rsplit(".", 1)[-1]

    def state_dtype(self, moment: str, storage_dtype: torch.dtype) -> torch.dtype:
        """The dtype it keeps ``moment`` in for a parameter stored in ``storage_dtype``.

        Only half-precision parameters get special state dtypes: optimizers keep fp32 state for fp32 parameters.
        """
        if storage_dtype not in HALF_DTYPES:
            fixed = dict(self.moment_dtypes).get(moment) if self.moment_dtypes_for_all else None
            return fixed or storage_dtype
        if moment == "exp_avg_sq" and self.exp_avg_sq_dtype is not None:
            return self.exp_avg_sq_dtype
        fixed = dict(self.moment_dtypes).get(moment)
        if fixed is not None:
            return fixed
        if self.kind is OptimizerKind.KEEPS_MASTER and self.exp_avg_sq_dtype is not None:
            return self.exp_avg_sq_dtype  # master-keeping optimizers keep both moments at the same width
        return storage_dtype

    def state_text(self, storage_dtype: torch.dtype | None) -> str:
        """The moment dtypes in words (``"bfloat16 / float32"`` for exp_avg / exp_avg_sq), as the contract shows."""
        if self.kind is OptimizerKind.UNKNOWN or storage_dtype is None:
            return "unknown" if self.kind is OptimizerKind.UNKNOWN else "-"
        if not self.moments:
            return "none"
        return " / ".join(dict.fromkeys(self._moment_text(m, storage_dtype) for m in self.moments))

    def _moment_text(self, moment: str, storage_dtype: torch.dtype) -> str:
        if self.quantized_moments:
            return QUANTIZED_MOMENT_TEXT
        return self.moment_words(moment, self.state_dtype(moment, storage_dtype))

    def moment_words(self, moment: str, dtype: torch.dtype) -> str:
        """``moment`` kept in ``dtype``, in the contract's words (``"bfloat16 (stochastic rounding)"``)."""
        stochastic = moment in self.stochastic_moments and dtype in HALF_DTYPES
        return f"{dtype_name(dtype)} (stochastic rounding)" if stochastic else dtype_name(dtype)

    def state_parts(self, storage_dtype: torch.dtype) -> list[tuple[str, float]]:
        """Bytes per parameter of each part of its state, e.g. ``[("exp_avg bfloat16", 2.0), ...]``."""
        if self.kind is OptimizerKind.UNKNOWN:
            return []  # nothing known to count
        half = storage_dtype in HALF_DTYPES
        parts = []
        for moment in self.moments:
            if self.quantized_moments:
                parts.append((f"{moment} {QUANTIZED_MOMENT_TEXT}", FLASH_QUANTIZED_MOMENT_BYTES))
                continue
            dtype = self.state_dtype(moment, storage_dtype)
            parts.append((f"{moment} {self._moment_text(moment, storage_dtype)}", float(dtype.itemsize)))
        if half and self.master_bytes:
            label = self.master_label or (
                "error-correction bits" if self.name.startswith("flashoptim.") else "master weights"
            )
            parts.append((label, float(self.master_bytes)))
        if half and self.compensation_buffer:
            parts.append((f"compensation {dtype_name(storage_dtype)}", float(storage_dtype.itemsize)))
        return parts

    def step_transient(self, storage_dtype: torch.dtype, *, on_cpu: bool = False) -> float | None:
        """Bytes per parameter the step allocates on top of the steady state (``None``: not known).

        Args:
            storage_dtype: Dtype of the parameters.
            on_cpu: Whether the parameters live on the CPU (before a run the accelerator's default is assumed).
        """
        temporaries = (on_cpu and self.step_temporaries_on_cpu) or self.step_temporaries
        if temporaries is None:
            return None
        copies, extra = temporaries
        return copies * storage_dtype.itemsize + extra

    @property
    def buffer_keys(self) -> tuple[str, ...]:
        """State keys where a compensation buffer or master copy may live, most likely first."""
        if self.kind is OptimizerKind.KEEPS_MASTER:
            return MASTER_KEYS + COMPENSATION_KEYS
        return COMPENSATION_KEYS + MASTER_KEYS
