"""Two other frameworks' configs, read without their packages: LitGPT's layout and NeMo 2's precision plugin.

LitGPT's configs (``config_hub/finetune/<model>/*.yaml``) have no ``trainer:`` section: ``precision``, ``devices``,
``num_nodes`` and ``optimizer`` sit at the top level, and LitGPT hands them to Fabric. They are read as the trainer
section of the Lightning precision plugin and strategy that Fabric builds from them, so the plan, the contract and the
verdict are this library's own.

NeMo 2 puts ``MegatronMixedPrecision`` in ``trainer.plugins``. It is read by its ``precision`` field, the way NeMo
reads that field, through a stand-in class of the same name, so ``explain`` works where NeMo is not installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.plugins.precision import Precision

from lightning_precision._imports import import_object
from lightning_precision.config_classes import ClassSpec
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import LIGHTNING_PLUGINS, get_mode
from lightning_precision.upstream import installed_version

# NeMo 2's precision plugin, under each path NeMo exports it: read by its ``precision`` field, never imported.
NEMO_PRECISION_PLUGINS = (
    "nemo.lightning.MegatronMixedPrecision",
    "nemo.lightning.pytorch.plugins.MegatronMixedPrecision",
    "nemo.lightning.pytorch.plugins.mixed_precision.MegatronMixedPrecision",
)
# How MegatronMixedPrecision reads its ``precision`` field (NeMo's rule): these select half; anything else is 32-true.
NEMO_PLUGIN_PRECISIONS = {
    **dict.fromkeys(("bf16", "bf16-mixed"), "bf16-mixed"),
    **dict.fromkeys(("fp16", "fp16-mixed", "16", "16-mixed"), "16-mixed"),
}
NEMO_PLUGIN_OTHER_PRECISION = "32-true"

# LitGPT's scripts (finetune, pretrain) take these at the top level; a config without a trainer section that sets
# one of them is LitGPT's. Their defaults are LitGPT's: ``precision=None`` picks bf16-mixed (16-mixed on a GPU without
# bf16, or MPS: also a mixed precision, so the verdict is the same), ``optimizer="AdamW"`` (torch.optim).
LITGPT_KEYS = ("precision", "devices", "num_nodes", "quantize", "optimizer")
LITGPT_MARKERS = LITGPT_KEYS[:3]  # "optimizer" alone is also this library's own top-level section
LITGPT_DEFAULT_PRECISION = "bf16-mixed"
LITGPT_DEFAULT_OPTIMIZER = "AdamW"


@dataclass
class LitGPTSections:
    """A LitGPT config read as this library's sections.

    Attributes:
        trainer: The trainer section: the Lightning precision plugin, and the strategy, devices and nodes.
        optimizer: The optimizer as LitGPT builds it (a ``torch.optim`` name or a ``class_path`` mapping).
        notes: How it was read, one line each.
    """

    trainer: dict[str, Any]
    optimizer: Any
    notes: list[str]


def is_litgpt(cfg: Mapping[str, Any]) -> bool:
    """Whether a whole config is LitGPT's: no trainer section, no Hydra defaults, and LitGPT's top-level keys."""
    return "trainer" not in cfg and "defaults" not in cfg and any(k in cfg for k in LITGPT_MARKERS)


def read_litgpt(cfg: Mapping[str, Any], *, source: str = "config") -> LitGPTSections:
    """A LitGPT config (``config_hub/finetune/*/*.yaml``) as the trainer section of what LitGPT's Fabric builds.

    ``precision`` becomes the Lightning precision plugin Fabric builds for it (LitGPT passes the string to Fabric),
    ``devices`` times ``num_nodes`` above one becomes the ``ModelParallelStrategy`` LitGPT uses, and ``optimizer`` (a
    ``torch.optim`` name or a ``class_path``/``init_args`` mapping) is read as LitGPT builds it.

    Raises:
        PrecisionConfigError: If the precision is not one Fabric builds (``bf16-flash`` is this library's: LitGPT's
            command line cannot take it), or ``quantize`` is set (bitsandbytes' plugin and optimizer, not modelled).
    """
    read = [k for k in LITGPT_KEYS if k in cfg]
    others = sorted(str(k) for k in cfg if k not in LITGPT_KEYS)
    notes = [
        f"read as a LitGPT config (no trainer section): {', '.join(read)} read"
        + (f"; {', '.join(others)} not about precision" if others else "")
    ]
    if cfg.get("quantize") is not None:
        raise PrecisionConfigError(
            f"{source}: quantize={cfg['quantize']!r}: LitGPT then builds bitsandbytes' BitsandbytesPrecision and "
            "PagedAdamW whatever precision and optimizer say, which is not modelled here; remove quantize to judge "
            "the run without quantization."
        )
    precision = cfg.get("precision")
    if precision is None:
        precision = LITGPT_DEFAULT_PRECISION
        notes.append(
            f"precision not set: LitGPT picks {LITGPT_DEFAULT_PRECISION} (16-mixed on a GPU without bf16 or on MPS: "
            "mixed too, the same verdict)"
        )
    mode = get_mode(precision, what="precision")
    if mode.name not in LIGHTNING_PLUGINS:
        raise PrecisionConfigError(
            f"precision={precision!r} is this library's, and LitGPT hands precision to Fabric, which does not know it. "
            f"Give one of {', '.join(LIGHTNING_PLUGINS)}, or run the fine-tune with the library's Fabric plugin "
            "(docs/recipes.md, 'LitGPT fine-tune with the Fabric plugin')."
        )
    plugin = {"class_path": f"lightning.pytorch.plugins.precision.{LIGHTNING_PLUGINS[mode.name]}"}
    if "precision" in _parameters_of(plugin["class_path"]):
        plugin["init_args"] = {"precision": mode.name}
    trainer: dict[str, Any] = {"plugins": [plugin]}
    for key in ("devices", "num_nodes"):
        if cfg.get(key) is not None:
            trainer[key] = cfg[key]
    devices, nodes = cfg.get("devices", 1), cfg.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and devices * nodes > 1:
        trainer["strategy"] = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": devices * nodes, "tensor_parallel_size": 1},
        }
    elif not isinstance(devices, int) or devices < 0:
        notes.append(f"devices={devices!r}: LitGPT uses ModelParallelStrategy when it finds more than one GPU")
    optimizer = cfg.get("optimizer")
    if optimizer is None:
        optimizer = LITGPT_DEFAULT_OPTIMIZER
        notes.append(f"no optimizer: LitGPT's default {LITGPT_DEFAULT_OPTIMIZER} (torch.optim.AdamW)")
    return LitGPTSections(trainer, optimizer, notes)


def nemo_precision_plugin(entry: Any, where: str, *, build: bool) -> ClassSpec | None:
    """NeMo 2's ``MegatronMixedPrecision`` entry in ``trainer.plugins``, read without NeMo; ``None`` for other entries.

    Reading (``build=False``): a :class:`ClassSpec` of a stand-in precision plugin of that name, with the entry's
    arguments, so the plan reads ``precision`` as it reads any plugin's. Building: ``None`` (built as any entry) if
    NeMo imports, else an error naming the class.

    Raises:
        PrecisionConfigError: When building and NeMo does not import; or the entry's arguments are not a mapping.
    """
    if not isinstance(entry, Mapping):
        return None
    path = entry.get("class_path", entry.get("_target_"))
    if path not in NEMO_PRECISION_PLUGINS:
        return None
    if build:
        try:
            import_object(path, where=where)
        except PrecisionConfigError as err:
            version = installed_version("nemo_toolkit")
            fix = (
                f"nemo_toolkit {version} is installed and does not provide it: build it with the NeMo 2 release the "
                "config was written for"
                if version is not None
                else "Install NeMo 2 to build it"
            )
            raise PrecisionConfigError(
                f"{where}: the precision plugin {path} cannot be built: it does not import here ({err.__cause__ or err})."
                f" {fix} (explain reads its precision without building it)."
            ) from err
        return None
    if "class_path" in entry:
        args = entry.get("init_args") or {}
    else:
        args = {k: v for k, v in entry.items() if not str(k).startswith("_")}
    if not isinstance(args, Mapping):
        raise PrecisionConfigError(f"{where}.init_args must be a mapping of arguments, got {args!r}.")
    given = str(args.get("precision"))  # NeMo reads an int as its string
    precision = NEMO_PLUGIN_PRECISIONS.get(given, NEMO_PLUGIN_OTHER_PRECISION)
    note = f"{where}: {path} read without importing it: precision {precision} from its 'precision' field"
    if given not in NEMO_PLUGIN_PRECISIONS:
        note += f" ({given!r}: NeMo runs {precision} for anything but {', '.join(map(repr, NEMO_PLUGIN_PRECISIONS))})"
    others = sorted(str(k) for k in args if k != "precision")
    if others:
        note += f"; its other arguments ({', '.join(others)}) are Megatron's and not judged here"
    return ClassSpec(_stand_in(path, note), {**args, "precision": precision}, where)


def _stand_in(path: str, note: str) -> type:
    """A precision plugin class named as ``path``, standing in for the class that is not imported."""
    module, _, name = path.rpartition(".")

    def __init__(self: Any, precision: str, **options: Any) -> None:  # read for its signature only
        raise TypeError(f"{path} is read from the config, never built here")

    attributes = {"__module__": module, "__init__": __init__, "__doc__": f"Stand-in for {path}.", "read_note": note}
    return type(name, (Precision,), attributes)


def stand_in_note(spec: Any) -> str | None:
    """How a plugin read by :func:`nemo_precision_plugin` was read, for the notes; ``None`` for any other."""
    return getattr(getattr(spec, "cls", None), "read_note", None) if isinstance(spec, ClassSpec) else None


def _parameters_of(path: str) -> tuple[str, ...]:
    return tuple(inspect.signature(import_object(path)).parameters)
