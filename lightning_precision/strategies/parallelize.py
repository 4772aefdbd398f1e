"""Apply FSDP2 (``fully_shard``) to a model, torchtitan ``parallelize`` style: blocks first, then the top, then the root.

Each block becomes its own FSDP unit, so only one block's full parameters are resident at a time. Modules at the top
of the model that are not blocks (embeddings, heads, norms) become units of their own with the same mixed-precision
policy, so their inputs are cast to the compute dtype. The root is sharded last with a policy that does not cast its
inputs or outputs: in Lightning the root is the LightningModule, whose "inputs" are whole batches (audio included,
which must keep its dtype) and whose "output" is the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lightning_precision._logging import info_rank_zero
from lightning_precision.dtypes import dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.fp32_modules import (
    Fp32ModuleSelector,
    add_fp32_boundaries,
    cast_keeping_fp32,
    marked_fp32_modules,
    select_fp32_modules,
)

if TYPE_CHECKING:
    from lightning_precision.strategies.fsdp2_plan import FSDP2Precision

BlockSelector = None | str | Sequence[str] | Callable[[str, nn.Module], bool]

# Containers that only hold modules and are never called: sharding one would group parameters that no forward of
# the container ever gathers.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def block_selector(blocks: BlockSelector) -> Callable[[str, nn.Module], bool] | None:
    """Turn the ``blocks`` option into a predicate ``(qualified_name, module) -> is a block``.

    Returns ``None`` for the default, which depends on the model (see :func:`select_blocks`).

    Args:
        blocks: ``None`` (default: every child of an ``nn.ModuleList``, the usual home of transformer layers),
            a class name or a list of class names (e.g. ``["LlamaDecoderLayer"]``), or a callable
            ``(name, module) -> bool``.

    Raises:
        PrecisionConfigError: If ``blocks`` is none of these.
    """
    if blocks is None:
        return None
    if isinstance(blocks, str):
        blocks = [blocks]
    if isinstance(blocks, Sequence) and all(isinstance(b, str) for b in blocks):
        names = frozenset(blocks)
        return lambda name, module: type(module).__name__ in names
    if callable(blocks):
        return blocks
    raise PrecisionConfigError(
        f"blocks={blocks!r} is not valid. Give None (children of nn.ModuleList), a class name or list of class names, "
        "or a callable (name, module) -> bool."
    )


def select_blocks(model: nn.Module, blocks: BlockSelector = None) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``blocks`` selects, innermost first (the order ``fully_shard`` needs).

    Args:
        model: The model.
        blocks: See :func:`block_selector`.

    Returns:
        ``(qualified_name, module)`` pairs; the root itself is never a block.
    """
    is_block = block_selector(blocks)
    in_list = {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m.children()}
    selected = []
    for name, module in model.named_modules():
        if not name:
            continue
        if is_block is None:
            hit = id(module) in in_list and any(True for _ in module.parameters())
        else:
            hit = bool(is_block(name, module))
        if hit:
            selected.append((name, module))
    # Children before parents: a unit owns the parameters that no sharded descendant owns.
    return selected[::-1]


def top_level_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Direct children of ``model`` (looking through ModuleList/ModuleDict) that still own unsharded parameters."""
    units = []

    def visit(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            qualified = f"{prefix}{name}"
            if isinstance(child, FSDPModule):
                continue
            if isinstance(child, _CONTAINERS):
                visit(f"{qualified}.", child)
            elif _unsharded_params(child):
                units.append((qualified, child))

    visit("", model)
    return units


def tied_groups(units: Sequence[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """``units`` grouped so that modules sharing a parameter (tied weights) are in one group, in first-seen order."""
    groups: list[list[tuple[str, nn.Module]]] = []
    owner: dict[int, int] = {}  # id(parameter) -> index of the group holding it
    for unit in units:
        hits = sorted({owner[id(p)] for p in _unsharded_params(unit[1]) if id(p) in owner})
        if hits:
            target = hits[0]
            for other in reversed(hits[1:]):  # a module tied to two earlier groups joins them
                groups[target] += groups[other]
                groups[other] = []
            groups[target].append(unit)
        else:
            target = len(groups)
            groups.append([unit])
        for _, module in groups[target]:
            owner.update((id(p), target) for p in _unsharded_params(module))
    return [g for g in groups if g]


def check_no_tie_across(model: nn.Module, units: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse units (blocks, fp32 modules) that share a parameter while neither contains the other: FSDP2 manages a
    parameter in the one group that shards it first, so the other unit would run with it sharded.

    Raises:
        PrecisionConfigError: Naming the parameter, both modules and the installed torch.
    """
    seen: dict[int, str] = {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for unit_name, unit in units:
        for param in unit.parameters():
            other = seen.setdefault(id(param), unit_name)
            if other != unit_name and not (unit_name.startswith(f"{other}.") or other.startswith(f"{unit_name}.")):
                raise PrecisionConfigError(
                    f"FSDP2: the parameter {names.get(id(param), '?')!r} is tied between {other!r} and {unit_name!r}, "
                    f"which are sharded as separate units (blocks or fp32 modules); FSDP2 (torch {torch.__version__}) "
                    "manages a parameter in one group only. Select a block that contains both, or leave them to the "
                    "top-level sharding, which puts tied modules in one group."
                )


def _unsharded_params(module: nn.Module) -> list[nn.Parameter]:
    owned: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            owned.update(id(p) for p in sub.parameters())
    return [p for p in module.parameters() if id(p) not in owned]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied somewhere in ``model`` (e.g. in ``configure_model``)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def root_policy(policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """The policy for the root: same parameter and reduce dtypes, but inputs and outputs left alone."""
    return MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, output_dtype=None, cast_forward_inputs=False
    )


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    *,
    blocks: BlockSelector = None,
    reshard_after_forward: bool = True,
    block_policy: MixedPrecisionPolicy | None = None,
    fp32_units: Sequence[nn.Module] = (),
) -> list[str]:
    """Shard ``model`` with FSDP2: each block, then each remaining top-level module, then the root.

    Args:
        model: The model (in Lightning, the LightningModule). Its parameters must already be in their storage dtype:
            FSDP2 keeps whatever dtype it shards as the resident shard.
        mesh: The data-parallel mesh (1-D).
        mp_policy: The policy for top-level modules (and for blocks, unless ``block_policy`` is given).
        blocks: Which modules are blocks (see :func:`block_selector`).
        reshard_after_forward: Free each block's gathered parameters after its forward (ZeRO-3); ``False`` keeps
            them until backward (ZeRO-2: more memory, less communication).
        block_policy: The policy for blocks, if it differs (e.g. block outputs left in the compute dtype).
        fp32_units: Modules kept in fp32, sharded first as units of their own that gather and reduce in fp32 and
            leave their inputs and outputs to the module's own casting (:mod:`lightning_precision.fp32_modules`).

    Returns:
        Qualified names of the modules made FSDP units, root last (``""``).
    """
    sharded = []
    names = {id(module): name for name, module in model.named_modules()}
    fp32_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for unit in fp32_units:
        if _unsharded_params(unit):
            fully_shard(unit, mesh=mesh, mp_policy=fp32_policy, reshard_after_forward=reshard_after_forward)
            sharded.append(names[id(unit)])
    selected = select_blocks(model, blocks)
    check_no_tie_across(model, [*((names[id(u)], u) for u in fp32_units), *selected])
    for name, block in selected:
        if not _unsharded_params(block):  # every parameter already belongs to an inner block
            continue
        fully_shard(block, mesh=mesh, mp_policy=block_policy or mp_policy, reshard_after_forward=reshard_after_forward)
        sharded.append(name)
    for group in tied_groups(top_level_units(model)):
        # Tied weights (an embedding shared with the output head) must live in one FSDP group: torch refuses a
        # parameter managed by two (torch 2.13 raises ValueError), so modules sharing one are sharded together.
        modules = [unit for _, unit in group]
        fully_shard(
            modules if len(modules) > 1 else modules[0],
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
        sharded.extend(name for name, _ in group)
    # The root is gathered again right at the start of backward, so it is not resharded after forward.
    fully_shard(model, mesh=mesh, mp_policy=root_policy(mp_policy), reshard_after_forward=False)
    sharded.append("")
    return sharded


def cast_parameters(model: nn.Module, dtype: torch.dtype, *, where: str) -> int:
    """Cast every floating-point parameter of ``model`` that is not in ``dtype`` to it, in place; logs the count.

    Returns:
        How many parameters were cast.
    """
    cast = 0
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    if cast:
        info_rank_zero(f"{where}: cast {cast} parameters to storage dtype {dtype_name(dtype)}.")
    return cast


def shard_in_storage_dtype(
    model: nn.Module,
    mesh: DeviceMesh,
    plan: FSDP2Precision,
    *,
    cast_storage: Callable[[nn.Module], Any],
    fp32_modules: Sequence[Fp32ModuleSelector] = (),
    blocks: BlockSelector = None,
    reshard_after_forward: bool = True,
    where: str,
) -> tuple[str, ...]:
    """Put ``model`` in the storage dtype of ``plan``, then shard it per block (:func:`parallelize`).

    The one sharding path of ``FSDP2Strategy`` and of Fabric's ``fsdp2_parallelize``. The storage cast runs before
    sharding, because FSDP2 keeps whatever dtype it shards as the resident shard and a DTensor shard must never be
    re-cast. Submodules selected by ``fp32_modules``, and those a precision plugin already kept in fp32, stay fp32
    and become fp32 units of their own.

    Args:
        model: The model, not sharded yet.
        mesh: The data-parallel mesh (1-D).
        plan: The dtype plan (:func:`~lightning_precision.strategies.fsdp2_plan.resolve_fsdp2_precision`).
        cast_storage: Puts the model's parameters in the storage dtype (the caller knows who casts: a precision
            plugin or :func:`cast_parameters`).
        fp32_modules: Selectors of submodules kept in fp32 (see :mod:`lightning_precision.fp32_modules`).
        blocks: Which modules are blocks (see :func:`block_selector`).
        reshard_after_forward: As in :func:`parallelize`.
        where: Who shards, for the log line.

    Returns:
        The qualified names of the submodules kept in fp32.

    Raises:
        PrecisionConfigError: If an ``fp32_modules`` selector matches no submodule.
    """
    kept = select_fp32_modules(model, fp32_modules) if plan.mode.half_dtype else []
    names = {name for name, _ in kept}
    kept += [(n, m) for n, m in marked_fp32_modules(model) if n not in names and not _inside(n, names)]
    cast_keeping_fp32(model, kept, cast_storage)
    add_fp32_boundaries(kept, plan.compute_dtype)
    units = parallelize(
        model,
        mesh,
        plan.mp_policy,
        blocks=blocks,
        reshard_after_forward=reshard_after_forward,
        block_policy=plan.block_policy,
        fp32_units=[module for _, module in kept],
    )
    info_rank_zero(
        f"{where}: sharded {len(units) - 1} modules and the root over {mesh.size()} data-parallel ranks; storage "
        f"{dtype_name(plan.storage_dtype)}{' (auto)' if plan.storage_was_auto else ''}, compute "
        f"{dtype_name(plan.compute_dtype)}, reduce {dtype_name(plan.reduce_dtype)}."
    )
    return tuple(name for name, _ in kept)


def _inside(name: str, outer: set[str]) -> bool:
    return any(name.startswith(f"{o}.") for o in outer)
