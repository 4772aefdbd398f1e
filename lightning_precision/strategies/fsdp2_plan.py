"""FSDP2's dtype plan: the precision and the strategy's options mapped onto a storage dtype and a
``MixedPrecisionPolicy``. A pure function of the config, so every rank (and ``explain``) plans the same."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.dtypes import HALF_DTYPES, dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.storage import StorageDecision, decide_storage

_POLICY_KEYS = ("param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs")


@dataclass(frozen=True)
class FSDP2Precision:
    """What the strategy decided for the three dtypes (a pure function of the config: the same on every rank).

    Attributes:
        mode: The trainer's precision.
        storage: The storage decision for the resident sharded parameters (its ``dtype`` is ``None`` when they are
            left as the model holds them, PEFT).
        mp_policy: The FSDP2 policy for the blocks.
    """

    mode: PrecisionMode
    storage: StorageDecision
    mp_policy: MixedPrecisionPolicy

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """Dtype of the resident sharded parameters."""
        return self.storage.dtype

    @property
    def storage_was_auto(self) -> bool:
        """Whether ``"auto"`` chose the storage dtype through the pairing rule."""
        return self.storage.was_auto

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.mp_policy.param_dtype or self.storage_dtype or self.mode.compute_dtype

    @property
    def block_policy(self) -> MixedPrecisionPolicy:
        """The policy for blocks: as :attr:`mp_policy`, but a block's output stays in the compute dtype unless
        ``output_dtype`` asks for the half dtype explicitly (casting between blocks would only be cast back)."""
        policy = self.mp_policy
        output = policy.output_dtype if policy.output_dtype in HALF_DTYPES else None
        return MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype, output, policy.cast_forward_inputs)

    @property
    def reduce_dtype(self) -> torch.dtype | None:
        return self.mp_policy.reduce_dtype or self.mp_policy.param_dtype or self.storage_dtype

    def to_dict(self) -> dict[str, Any]:
        """Plain strings, for checkpoints and loggers."""
        return {
            "precision": self.mode.name,
            "storage_dtype": dtype_name(self.storage_dtype),
            "storage_was_auto": self.storage_was_auto,
            "mp_policy": policy_to_dict(self.mp_policy),
        }


def policy_to_dict(policy: MixedPrecisionPolicy) -> dict[str, Any]:
    """A policy as plain values (dtype names, ``None`` as ``"-"``)."""
    return {
        "param_dtype": dtype_name(policy.param_dtype),
        "reduce_dtype": dtype_name(policy.reduce_dtype),
        "output_dtype": dtype_name(policy.output_dtype),
        "cast_forward_inputs": policy.cast_forward_inputs,
    }


def parse_mp_policy(mp_policy: MixedPrecisionPolicy | Mapping[str, Any] | None) -> dict[str, Any]:
    """Read the ``mp_policy`` option into a dict of the four fields, ``None`` where not given.

    Args:
        mp_policy: A ``MixedPrecisionPolicy`` (its ``None`` fields count as not given), a mapping with keys among
            ``param_dtype``, ``reduce_dtype``, ``output_dtype``, ``cast_forward_inputs`` (dtype spellings as in
            :func:`~lightning_precision.dtypes.parse_dtype`), or ``None``.

    Raises:
        PrecisionConfigError: On an unknown key, a value that is not a dtype, or another type.
    """
    if mp_policy is None:
        return dict.fromkeys(_POLICY_KEYS)
    if isinstance(mp_policy, MixedPrecisionPolicy):
        return {k: getattr(mp_policy, k) for k in _POLICY_KEYS}
    if not isinstance(mp_policy, Mapping):
        raise PrecisionConfigError(
            f"FSDP2Strategy(mp_policy={mp_policy!r}) is not valid: give a torch MixedPrecisionPolicy or a mapping with "
            f"keys {list(_POLICY_KEYS)}."
        )
    unknown = sorted(str(k) for k in mp_policy if k not in _POLICY_KEYS)
    if unknown:
        raise PrecisionConfigError(
            f"FSDP2Strategy(mp_policy=...) has unknown key(s) {unknown}. Valid keys: {list(_POLICY_KEYS)}."
        )
    out = {k: parse_dtype(mp_policy.get(k), what=f"mp_policy.{k}") for k in _POLICY_KEYS[:3]}
    cast = mp_policy.get("cast_forward_inputs")
    if cast is not None and not isinstance(cast, bool):
        raise PrecisionConfigError(f"mp_policy.cast_forward_inputs={cast!r} is not valid: give true or false.")
    out["cast_forward_inputs"] = cast
    return out


def storage_option(own: Any, model_torch_dtype: torch.dtype | None) -> Any:
    """The storage dtype a plan uses: the strategy's own, else (when it is ``"auto"``) a config's
    ``model.torch_dtype``, else ``"auto"``; the strategy's explicit choice wins over how the model is loaded."""
    if parse_dtype(own, what="FSDP2Strategy(storage_dtype=...)") is None and model_torch_dtype is not None:
        return model_torch_dtype
    return own


def agreed_optimizer(own: Any, config_optimizer: Any) -> Any:
    """The optimizer a plan judges: the strategy's own, or a config's optimizer section when it has none.

    Raises:
        PrecisionConfigError: If both are given and name different optimizers.
    """
    if config_optimizer is None:
        return own
    config_name = classify_optimizer(config_optimizer).name
    if own is None:
        return config_optimizer
    if classify_optimizer(own).name != config_name:
        raise PrecisionConfigError(
            f"FSDP2Strategy(optimizer={own!r}) and the config's optimizer {config_name!r} disagree; give the optimizer "
            "in one place."
        )
    return own


def resolve_fsdp2_precision(
    precision: str | PrecisionMode,
    *,
    storage_dtype: Any = "auto",
    mp_policy: MixedPrecisionPolicy | Mapping[str, Any] | None = None,
    optimizer: Any = None,
    peft: bool = False,
) -> FSDP2Precision:
    """Map a precision and the strategy's options onto a storage dtype and an FSDP2 ``MixedPrecisionPolicy``.

    * ``bf16-mixed``: storage by the pairing rule (``"auto"``: fp32 for torch optimizers and unknown ones, bf16 for
      optimizers that keep master weights), compute bf16. ``16-mixed`` likewise with fp16.
    * ``bf16-true`` / ``bf16-flash``: bf16 storage and compute.
    * ``32-true`` / ``64-true``: no mixed precision (all policy dtypes ``None``; an explicit ``reduce_dtype`` is kept).
    * The default policy for half precisions: param (compute) dtype = the precision's half dtype, reduce dtype fp32,
      output dtype fp32. The output dtype applies to what the model hands to ``training_step`` (the outputs of its
      top-level modules: logits, and the loss of a Hugging Face model), so the loss is fp32 as under Lightning's
      ``bf16-mixed``; blocks inside hand their outputs on in the compute dtype (:attr:`FSDP2Precision.block_policy`).
      Fields given in ``mp_policy`` override it; ``output_dtype`` may be fp32 or the half dtype.

    Args:
        precision: The trainer's precision string or mode.
        storage_dtype: ``"auto"`` or a dtype spelling.
        mp_policy: See :func:`parse_mp_policy`.
        optimizer: The optimizer class, import path or config mapping, if known before it exists.
        peft: Only adapters train: storage is left as the model holds it.

    Returns:
        The decision.

    Raises:
        PrecisionConfigError: If the options contradict each other: an explicit ``storage_dtype`` against a
            precision that fixes storage (``*-true``, ``*-flash``, ``32-true``); ``mp_policy.param_dtype`` or
            ``output_dtype`` (other than fp32) against the precision's compute dtype; a half ``storage_dtype`` that is not the compute
            half dtype (fp16 storage with bf16 compute would re-round every parameter on each gather).
    """
    mode = (
        get_mode(precision, what="FSDP2Strategy precision") if not isinstance(precision, PrecisionMode) else precision
    )
    explicit = parse_dtype(storage_dtype, what="FSDP2Strategy(storage_dtype=...)")
    try:
        decision = decide_storage(explicit=explicit, precision=mode, optimizer=optimizer, peft=peft)
    except PrecisionConfigError as err:
        raise PrecisionConfigError(f"FSDP2Strategy(storage_dtype={storage_dtype!r}): {err}") from err
    storage = decision.dtype
    given = parse_mp_policy(mp_policy)
    half = mode.half_dtype
    for key in ("param_dtype", "output_dtype"):
        value = given[key]
        expected = half or mode.compute_dtype
        if key == "output_dtype" and value == torch.float32:
            continue  # outputs may always be handed on in full precision
        if value is not None and value != expected:
            raise PrecisionConfigError(
                f"FSDP2Strategy(mp_policy={{{key}: {dtype_name(value)}}}) contradicts precision={mode.name!r}, which "
                f"computes in {dtype_name(expected)}. Drop mp_policy.{key} (it follows the precision), or choose the "
                f"precision that computes in {dtype_name(value)}: "
                + (
                    "'bf16-mixed' (fp32 storage) or 'bf16-true'."
                    if value == torch.bfloat16
                    else f"one of {_for(value)}."
                )
            )
    cast = True if given["cast_forward_inputs"] is None else given["cast_forward_inputs"]
    if half is None:  # full precision: FSDP2 casts nothing
        policy = MixedPrecisionPolicy(reduce_dtype=given["reduce_dtype"], cast_forward_inputs=cast)
    else:
        policy = MixedPrecisionPolicy(
            param_dtype=half,
            reduce_dtype=given["reduce_dtype"] or torch.float32,
            output_dtype=given["output_dtype"] or torch.float32,
            cast_forward_inputs=cast,
        )
        if storage in HALF_DTYPES and storage != half:
            raise PrecisionConfigError(
                f"FSDP2Strategy(storage_dtype={dtype_name(storage)}) with precision={mode.name!r} (compute "
                f"{dtype_name(half)}): parameters stored in one half dtype and computed in the other are re-rounded on "
                f"every gather. Use storage_dtype={dtype_name(half)}, float32, or auto."
            )
    return FSDP2Precision(mode=mode, storage=decision, mp_policy=policy)


def _for(dtype: torch.dtype) -> str:
    return "'16-mixed', '16-true'" if dtype == torch.float16 else "'32-true'"
