"""FSDP2 for Lightning Fabric: a ``parallelize_fn`` for Fabric's ``ModelParallelStrategy`` that stores the parameters
in the dtype the pairing rule chose for the optimizer and shards them per block, as ``FSDP2Strategy`` does."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from typing_extensions import override

from lightning_precision.catalogue import classify_optimizer
from lightning_precision.dtypes import HALF_DTYPES, dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.fp32_modules import Fp32ModuleSelector, normalize_fp32_modules
from lightning_precision.pairing import Verdict, judge
from lightning_precision.policy import OnUnsafe, PolicyHolder, enforce, optional_on_unsafe
from lightning_precision.strategies.fsdp2_plan import FSDP2Precision, resolve_fsdp2_precision
from lightning_precision.strategies.parallelize import (
    BlockSelector,
    block_selector,
    cast_parameters,
    shard_in_storage_dtype,
)
from lightning_precision.values import parse_bool

# Which parallelize_fn sharded a module, and which Fabric plugin converted it: kept beside the modules, not on them,
# so a model still pickles and copies as it did, and forgotten with it.
_SHARDED_BY: weakref.WeakKeyDictionary[nn.Module, FSDP2Parallelize] = weakref.WeakKeyDictionary()
_CONVERTED_BY: weakref.WeakKeyDictionary[nn.Module, weakref.ref[PolicyHolder]] = weakref.WeakKeyDictionary()


class FSDP2Parallelize(PolicyHolder):
    """The callable :func:`fsdp2_parallelize` returns: ``(module, device_mesh) -> module``.

    Attributes:
        plan: The dtype plan (storage, compute, reduce), decided when this object is built: the same on every rank.
        fp32_module_names: The submodules kept in fp32, known once it has sharded a module.
        verdict: What the pairing rule said about the planned storage and the ``optimizer`` given, once it has
            sharded a module (``None`` before, or without an optimizer).
    """

    def __init__(
        self,
        plan: FSDP2Precision,
        blocks: BlockSelector,
        fp32_modules: tuple[Fp32ModuleSelector, ...],
        reshard_after_forward: bool,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        optimizer: Any = None,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.fp32_modules = fp32_modules
        self.reshard_after_forward = reshard_after_forward
        self.fp32_module_names: tuple[str, ...] = ()
        self.peft = peft
        self.optimizer = optimizer
        self._init_policy(on_unsafe)
        self.verdict: Verdict | None = None

    @override
    def explicit_on_unsafe(self) -> tuple[str, OnUnsafe] | None:
        return ("fsdp2_parallelize(on_unsafe=...)", self.on_unsafe_given) if self.on_unsafe_given else None

    def judge_planned(self, optimizer: Any) -> Verdict:
        """Judge the planned storage with the optimizer that will train it, as ``FSDP2Strategy`` judges its live
        optimizers (the same rule, ``"auto"`` and precision), and act under ``on_unsafe``.

        Raises:
            PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        """
        verdict = judge(
            self.plan.storage_dtype,
            classify_optimizer(optimizer),
            peft=self.peft,
            storage_was_auto=self.plan.storage_was_auto,
            precision=self.plan.mode,
            api="fabric",
        )
        self.verdict = enforce(verdict, self.on_unsafe, where="fsdp2_parallelize")
        return self.verdict

    def __call__(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Cast ``module`` to the planned storage dtype, then shard it per block over the data-parallel mesh.

        Raises:
            PrecisionConfigError: If the mesh has a tensor-parallel dimension larger than 1, or under a ``*-true`` /
                ``*-flash`` plan the Fabric precision plugin did not cast the parameters to the half dtype, or
                its ``on_unsafe`` disagrees with this one's.
            PrecisionPairingError: For an unsafe pairing of the planned storage and ``optimizer`` under
                ``on_unsafe="error"`` (the plugin's, or this one's): raised on every rank before anything is sharded.
        """
        plugin = converting_plugin(module)
        if plugin is not None:
            self.adopt_on_unsafe([plugin])  # the Fabric plugin's explicit policy applies here too
        if self.optimizer is not None:
            self.judge_planned(self.optimizer)
        self.fp32_module_names = shard_in_storage_dtype(
            module,
            _data_parallel_mesh(device_mesh),
            self.plan,
            cast_storage=self._cast_storage,
            fp32_modules=self.fp32_modules,
            blocks=self.blocks,
            reshard_after_forward=self.reshard_after_forward,
            where="fsdp2_parallelize",
        )
        _SHARDED_BY[module] = self  # the Fabric plugin's first-step check reads the plan from its module
        return module

    def _cast_storage(self, module: nn.Module) -> None:
        storage = self.plan.storage_dtype
        if storage is None:  # PEFT: the model keeps what it was loaded in
            return
        if self.plan.mode.family in ("true", "flash"):
            # Fabric calls the precision plugin's convert_module before the strategy's parallelize_fn, so the
            # plugin has cast (flashoptim.cast_model keeps normalization layers fp32); casting again here would undo
            # what it kept in full precision. A model with no half parameter means the plugin does not match.
            if not any(p.dtype in HALF_DTYPES for p in module.parameters()):
                name = self.plan.mode.name
                raise PrecisionConfigError(
                    f"fsdp2_parallelize(precision={name!r}) stores parameters in {dtype_name(storage)}, cast by the "
                    f"Fabric precision plugin before sharding, but every parameter is full precision. Give Fabric the "
                    f"matching plugin (lightning_precision.fabric.HalfPrecisionForAudio / FlashPrecision({name!r}), "
                    "or precision='bf16-true'), or plan precision='bf16-mixed' for fp32 storage."
                )
            return
        cast_parameters(module, storage, where="fsdp2_parallelize")


def mark_converted(module: nn.Module, plugin: PolicyHolder) -> None:
    """Record on ``module`` the Fabric precision plugin that converted it, so sharding follows its ``on_unsafe``."""
    _CONVERTED_BY[module] = weakref.ref(plugin)


def converting_plugin(module: nn.Module) -> PolicyHolder | None:
    """The precision plugin of this library that converted ``module`` (see :func:`mark_converted`), if any."""
    ref = _CONVERTED_BY.get(module)
    return ref() if ref is not None else None


def sharding_of(module: nn.Module | None) -> FSDP2Parallelize | None:
    """The :class:`FSDP2Parallelize` that sharded ``module``, if one did."""
    return _SHARDED_BY.get(module) if module is not None else None


def _data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise PrecisionConfigError(
            f"fsdp2_parallelize shards over data parallelism only, but the mesh has a tensor-parallel size of "
            f"{device_mesh['tensor_parallel'].size()} (Fabric's ModelParallelStrategy defaults it to the devices per "
            "node). Use ModelParallelStrategy(parallelize_fn=..., data_parallel_size=<world size>, "
            "tensor_parallel_size=1)."
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def fsdp2_parallelize(
    precision: str = "bf16-mixed",
    *,
    optimizer: Any = None,
    storage_dtype: Any = "auto",
    mp_policy: MixedPrecisionPolicy | Mapping[str, Any] | None = None,
    blocks: BlockSelector = None,
    fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
    reshard_after_forward: bool = True,
    peft: bool = False,
    on_unsafe: OnUnsafe | None = None,
) -> FSDP2Parallelize:
    """A ``parallelize_fn`` for Fabric's ``ModelParallelStrategy`` with the storage decision of ``FSDP2Strategy``.

    The plan comes from :func:`~lightning_precision.strategies.resolve_fsdp2_precision` (``bf16-mixed`` with torch
    AdamW: fp32 storage, bf16 compute, fp32 reduction), and the module is cast and sharded by the same function as
    ``FSDP2Strategy``'s: each block, each remaining top-level module, then the root.

    Args:
        precision: The precision the plan is for. ``*-mixed``: this function casts to the storage dtype (use
            Fabric's default precision or :class:`~lightning_precision.fabric.CheckedMixedPrecision`); ``*-true`` /
            ``*-flash``: the Fabric precision plugin of the same precision casts, before this function runs.
        optimizer: The optimizer that will be built on the sharded parameters (class, import path or
            ``_target_`` mapping), so ``storage_dtype="auto"`` can decide; fp32 when not given.
        storage_dtype: ``"auto"`` or a dtype spelling.
        mp_policy: A ``MixedPrecisionPolicy`` or a mapping of its fields; unset fields follow the precision.
        blocks: Which modules are FSDP units (see :func:`~lightning_precision.strategies.parallelize`).
        fp32_modules: Submodules kept in fp32, each its own fp32 FSDP unit. Those a precision plugin already kept in
            fp32 stay fp32 without being listed again.
        reshard_after_forward: Free gathered block parameters after forward (ZeRO-3).
        peft: Only adapters train: storage is left to the model.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe storage/optimizer pairing, as
            ``FSDP2Strategy(on_unsafe=...)``. With ``optimizer`` given, the planned storage is judged when
            ``fabric.setup`` shards the model, on every rank before anything is sharded
            (``fsdp2_parallelize(optimizer=torch.optim.AdamW, storage_dtype="bf16")`` warns, or raises); the live
            optimizers are judged again by :func:`~lightning_precision.fabric.check` or, at their first step, by this
            library's Fabric plugins. ``None`` (default): the policy given to that plugin, else ``"warn"``; two
            explicit policies that disagree are an error.

    Returns:
        The ``(module, device_mesh) -> module`` callable; its ``plan`` holds the decision and its ``verdict`` the
        judgement once it has sharded.

    Raises:
        PrecisionConfigError: On an invalid or contradictory option (as ``FSDP2Strategy``).
    """
    what = "fsdp2_parallelize"
    policy = optional_on_unsafe(on_unsafe, what=f"{what}(on_unsafe)")
    plan = resolve_fsdp2_precision(
        precision, storage_dtype=storage_dtype, mp_policy=mp_policy, optimizer=optimizer, peft=peft, what=what
    )
    block_selector(blocks)  # fails now, not on every rank at setup
    selectors = normalize_fp32_modules(fp32_modules, what=f"{what}(fp32_modules=...)")
    reshard = parse_bool(reshard_after_forward, what=f"{what}(reshard_after_forward=...)", spellings=True)
    peft = parse_bool(peft, what=f"{what}(peft=...)", spellings=True)
    return FSDP2Parallelize(plan, blocks, selectors, reshard, on_unsafe=policy, peft=peft, optimizer=optimizer)
