"""Trainable parameters kept fp32 under true half precision: adapters (PEFT LoRA and the like) on a half base.

PEFT creates its adapters in fp32 on purpose; ``bf16-true`` casts the whole module, which would make them bf16, and
torch AdamW on bf16 adapters loses its small updates (the trap). So under the half-true plugins
(``HalfPrecisionForAudio``, Trainer and Fabric), a model that trains adapters keeps its trainable parameters fp32 and
its frozen base in half, unless ``keep_trainable_fp32=False``:

- **Adapter training** is recognised when the model holds a PEFT model or tuner layer (``peft.PeftModel``, or a LoRA
  layer injected with ``peft.inject_adapter_in_model``), when the plugin is given ``peft=True``, or, without PEFT,
  when some parameters are frozen and the trainable ones hold at most 10% of the parameter elements
  (:data:`ADAPTER_FRACTION`): then keeping them fp32 costs at most 2 extra bytes for each of those elements.
- **What is kept** is the smallest modules whose parameters all train: the module holding each trainable parameter,
  if it holds no frozen one (LoRA's ``lora_A.default`` and ``lora_B.default``). They become fp32 modules
  (:mod:`lightning_precision.fp32_modules`): fp32 storage, inputs and math, outputs handed on in the half dtype.
- A trainable parameter whose module also holds frozen parameters (BitFit's biases), that sits on the model's root,
  or that is tied to such a module, cannot be kept without changing that module's math: it stays half, the log line
  names it, and the pairing check judges it by its dtype.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

ADAPTER_FRACTION = 0.10  # trainable elements / all parameter elements at or below which a model trains adapters


@dataclass(frozen=True)
class TrainableFp32:
    """What :func:`trainable_fp32_modules` decided for one model.

    Attributes:
        reason: Why the trainable parameters are kept fp32 (``None``: they are not).
        modules: ``(name, module)`` of the modules kept fp32 for them.
        left_in_half: Names of trainable parameters that could not be kept (their module also holds frozen ones, or
            they are tied to such a module).
    """

    reason: str | None
    modules: list[tuple[str, nn.Module]]
    left_in_half: list[str]

    def describe(self, plugin: str, half: str) -> str:
        """The log line: what was kept and why."""
        names = [n for n, _ in self.modules]
        params = sum(p.numel() for _, m in self.modules for p in m.parameters())
        shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        kept = f"kept its trainable parameters ({params:,} elements) in float32 in {len(names)} modules ({shown})"
        line = f"{plugin}: {self.reason}: {kept if names else 'no module holds only trainable parameters'}; the frozen "
        line += f"ones are cast to {half}"
        if self.left_in_half:
            left = ", ".join(map(repr, self.left_in_half[:4]))
            line += (
                f"; {len(self.left_in_half)} trainable parameters stay {half} because their module also holds (or they "
                f"are tied to one holding) frozen ones ({left})"
            )
        return line + ". keep_trainable_fp32=False casts them too."


def adapter_training_reason(model: nn.Module, *, peft: bool = False) -> str | None:
    """Why ``model`` looks like adapter training, in words, or ``None`` if it does not (see the module docstring)."""
    peft_name = _peft_module_name(model)
    if peft_name is not None:
        return f"PEFT model ({'the model' if not peft_name else repr(peft_name)})"
    trainable, total = _element_counts(model)
    if not 0 < trainable < total:
        return None
    if peft:
        return "peft=True"
    if trainable <= ADAPTER_FRACTION * total:
        return (
            f"{trainable:,} of {total:,} parameter elements train ({trainable / total:.1%}, at most "
            f"{ADAPTER_FRACTION:.0%}: adapters)"
        )
    return None


def trainable_fp32_modules(model: nn.Module, keep: bool | None, *, peft: bool = False) -> TrainableFp32:
    """The modules of ``model`` to keep fp32 for its trainable parameters.

    Args:
        model: The model about to be cast to half precision.
        keep: ``True``: keep them whenever some parameters are frozen; ``False``: never; ``None``: when
            :func:`adapter_training_reason` finds adapter training.
        peft: The plugin's ``peft`` flag (only adapters train).
    """
    if keep is False:
        return TrainableFp32(None, [], [])
    reason = adapter_training_reason(model, peft=peft)
    if reason is None and keep:
        trainable, total = _element_counts(model)
        reason = "keep_trainable_fp32=True" if 0 < trainable < total else None
    if reason is None:
        return TrainableFp32(None, [], [])
    kept, left = _smallest_trainable_owners(model)
    return TrainableFp32(reason, kept, left) if kept or left else TrainableFp32(None, [], [])


def _smallest_trainable_owners(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    kept: dict[str, nn.Module] = {}
    left: list[str] = []
    for name, module in model.named_modules():
        own = [(key, p) for key, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if name and all(p.requires_grad for p in module.parameters()):
            kept[name] = module
        else:
            left += [f"{name}.{key}" if name else key for key, _ in own]
    # A parameter tied to a module that is not kept (one holding frozen parameters) cannot be fp32 on one side only.
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    covered = lambda owner: any(owner == k or owner.startswith(f"{k}.") for k in kept)
    while tied := [n for n, m in kept.items() if not all(covered(o) for p in m.parameters() for o in owners[id(p)])]:
        for name in tied:
            left += [f"{name}.{key}" for key, _ in kept.pop(name).named_parameters()]
    return list(kept.items()), left


def _element_counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _peft_module_name(model: nn.Module) -> str | None:
    # No PEFT object can exist unless peft was imported, so an installed but unused peft is never imported here.
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    classes = tuple(c for c in (getattr(peft, "PeftModel", None), _tuner_layer_class()) if isinstance(c, type))
    return next((name for name, module in model.named_modules() if isinstance(module, classes)), None)


def _tuner_layer_class() -> type | None:
    module = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(module, "BaseTunerLayer", None) if module is not None else None
