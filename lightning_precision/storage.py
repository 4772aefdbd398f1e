"""The storage decision: which dtype the trainable parameters are kept in, decided once, before the model exists.

The order of precedence, the only one in the library:

1. an explicit dtype (``model.torch_dtype``, or ``FSDP2Strategy(storage_dtype=...)``), which must agree with a
   precision that fixes storage;
2. a precision that casts the module (``*-true``, ``*-flash``, ``32-true``) sets storage to its dtype;
3. a PEFT run leaves storage to the model (the base weights are frozen);
4. otherwise (``"auto"``) the pairing rule's safe choice: ``float32`` for optimizers whose state follows the
   parameter dtype and for unknown ones, the precision's half dtype for optimizers that keep their own master weights
   or compensate their update.

:func:`resolve_trainer_cfg`, :class:`~lightning_precision.strategies.FSDP2Strategy` and ``explain`` all call
:func:`decide_storage`, and carry its :class:`StorageDecision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_precision.catalogue import OptimizerInfo, OptimizerKind, classify_optimizer
from lightning_precision.config_layouts import MODEL_DTYPE_PATHS, find_torch_dtype
from lightning_precision.config_resolve import model_read_part
from lightning_precision.dtypes import dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.values import expect_type


@dataclass(frozen=True)
class StorageDecision:
    """The storage dtype of the trainable parameters and why it was chosen.

    Attributes:
        dtype: The dtype, or ``None`` when it is left to the model (PEFT).
        reason: Why, in words (for logs and ``explain``).
        was_auto: Whether no explicit dtype and no storage-fixing precision decided it, so the pairing rule did.
            Then fp32 for an optimizer that keeps its own master weights is reported as wasteful.
    """

    dtype: torch.dtype | None
    reason: str
    was_auto: bool


def decide_storage(
    *,
    explicit: Any = None,
    explicit_what: str = "model.torch_dtype",
    precision: str | PrecisionMode | None = None,
    optimizer: Any = None,
    peft: bool = False,
) -> StorageDecision:
    """Decide the storage dtype (see the module docstring for the order).

    Args:
        explicit: An explicit dtype or spelling; ``None`` or ``"auto"`` leaves it to the rule.
        explicit_what: Where ``explicit`` came from, for messages.
        precision: The precision string or mode in effect, if known.
        optimizer: The optimizer as :func:`~lightning_precision.catalogue.classify_optimizer` takes it, or its
            :class:`~lightning_precision.catalogue.OptimizerInfo`; ``None`` counts as unknown.
        peft: Whether only adapters train.

    Returns:
        The decision.

    Raises:
        PrecisionConfigError: If ``explicit`` is not a dtype, or contradicts a precision that fixes storage.
        TypeError: If ``precision`` is neither a precision string nor a :class:`PrecisionMode`.
    """
    expect_type(
        precision, (str, int, PrecisionMode, type(None)), what="decide_storage(precision=...)",
        expected="a precision string (e.g. 'bf16-mixed') or a PrecisionMode",
    )  # fmt: skip
    mode = get_mode(precision) if isinstance(precision, (str, int)) else precision
    dtype = parse_dtype(explicit, what=explicit_what)
    if dtype is not None:
        if mode is not None and mode.storage_dtype is not None and dtype != mode.storage_dtype:
            fixed = dtype_name(mode.storage_dtype)
            raise PrecisionConfigError(
                f"{explicit_what}={dtype_name(dtype)} contradicts precision={mode.name!r}, which stores parameters in "
                f"{fixed}. Use {explicit_what}: {fixed} or auto, or a '*-mixed' precision for {dtype_name(dtype)} "
                "storage with half compute."
            )
        return StorageDecision(dtype, f"explicit {explicit_what}", was_auto=False)
    if mode is not None and mode.storage_dtype is not None:
        return StorageDecision(mode.storage_dtype, f"precision {mode.name!r} casts the module", was_auto=False)
    if peft:
        return StorageDecision(None, "PEFT: the model keeps the dtype it was loaded in", was_auto=True)
    info = optimizer if isinstance(optimizer, OptimizerInfo) or optimizer is None else classify_optimizer(optimizer)
    if info is not None and info.kind in (OptimizerKind.KEEPS_MASTER, OptimizerKind.COMPENSATED):
        half = (mode.half_dtype if mode is not None else None) or torch.bfloat16
        return StorageDecision(half, f"auto: {info.short_name} {_protects(info)}", was_auto=True)
    why = f"{info.short_name} keeps its state in the parameter dtype" if info is not None else "optimizer not known"
    if info is not None and info.kind is OptimizerKind.UNKNOWN:
        why = f"{info.short_name} is not in the catalogue"
    return StorageDecision(torch.float32, f"auto: {why}", was_auto=True)


def _protects(info: OptimizerInfo) -> str:
    if info.kind is OptimizerKind.KEEPS_MASTER:
        return "keeps its own master weights"
    return "compensates its update"


# NeMo AutoModel's function of the same name (nemo_automodel/components/optim/precision_warnings.py) takes these
# keywords, sets cfg_model.torch_dtype in place and returns None. This one never modifies the config and returns the
# dtype: a call written for AutoModel's would silently drop the decision, so it is refused (docs/api.md).
AUTOMODEL_ONLY_ARGUMENTS = ("is_peft", "context", "logger")


def resolve_storage_dtype(
    model_cfg: Any,
    optimizer_cfg: Any,
    peft: bool = False,
    precision: str | PrecisionMode | None = None,
    **automodel_arguments: Any,
) -> torch.dtype | None:
    """The storage dtype :func:`decide_storage` chooses for a model section and an optimizer section.

    Args:
        model_cfg: The model section (dict, OmegaConf or object; ``None``); its ``torch_dtype`` (or LightningCLI's
            ``init_args.torch_dtype``) is read, never modified.
        optimizer_cfg: The optimizer section, class, path or instance (``None``: treated as unknown).
        peft: Whether only adapters train.
        precision: The trainer's precision string or mode, if known.

    Returns:
        The storage dtype, or ``None`` when it is left to the model (PEFT).

    Raises:
        PrecisionConfigError: If ``torch_dtype`` is not a dtype, or contradicts the precision.
        TypeError: If called with NeMo AutoModel's keywords (``is_peft``, ``context``, ``logger``): that function of
            the same name sets ``cfg_model.torch_dtype`` in place and returns ``None``; the message shows the call
            to write here instead. Any other unknown keyword too.
    """
    if automodel_arguments:
        raise TypeError(_unexpected_arguments(automodel_arguments))
    if isinstance(model_cfg, Mapping):  # ours, NeMo's and Hugging Face's model.torch_dtype, or LightningCLI's
        # Only the dtype is resolved: a ??? there is an error naming it, one elsewhere (NeMo's) is never read.
        found = find_torch_dtype(model_read_part(model_cfg, paths=MODEL_DTYPE_PATHS))
        explicit, what = (found.value, found.path) if found is not None else (None, "model.torch_dtype")
    else:
        explicit, what = getattr(model_cfg, "torch_dtype", None), "model.torch_dtype"
    return decide_storage(
        explicit=explicit, explicit_what=what, precision=precision, optimizer=optimizer_cfg, peft=peft
    ).dtype


def _unexpected_arguments(given: Mapping[str, Any]) -> str:
    names = ", ".join(f"{k}={v!r}" for k, v in given.items())
    takes = "it takes model_cfg, optimizer_cfg, peft, precision"
    if not set(given) & set(AUTOMODEL_ONLY_ARGUMENTS):
        return f"resolve_storage_dtype() got unexpected keyword argument(s) {names}; {takes}."
    return (
        f"resolve_storage_dtype() got {names}: that is NeMo AutoModel's call (resolve_storage_dtype(cfg_model, "
        "cfg_opt, *, is_peft, context, logger)), which sets cfg_model.torch_dtype in place and returns None. This "
        "one never modifies the config and returns the dtype (None: left to the model): write "
        "`dtype = resolve_storage_dtype(cfg.model, cfg.optimizer, peft=is_peft)` and build the model with it "
        f"(or set cfg.model.torch_dtype from it when it is not None); {takes}."
    )
