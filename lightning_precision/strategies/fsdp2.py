"""FSDP2 with the safe precision pattern by default: fp32 storage for torch optimizers, bf16 compute, fp32 reduction."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from typing_extensions import override

from lightning_precision._logging import info_rank_zero
from lightning_precision.dtypes import HALF_DTYPES, dtype_name, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import PrecisionMode, get_mode
from lightning_precision.pairing import (
    OnUnsafe,
    Verdict,
    check_and_enforce,
    classify_optimizer,
    resolve_storage_dtype,
    validate_on_unsafe,
)
from lightning_precision.report import report_storage_change
from lightning_precision.strategies.parallelize import BlockSelector, block_selector, is_sharded, parallelize

CHECKPOINT_KEY = "lightning_precision_fsdp2"
_POLICY_KEYS = ("param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs")


@dataclass(frozen=True)
class FSDP2Precision:
    """What the strategy decided for the three dtypes (a pure function of the config: the same on every rank).

    Attributes:
        mode: The trainer's precision.
        storage_dtype: Dtype of the resident sharded parameters (``None``: left as the model holds them, PEFT).
        storage_was_auto: Whether ``storage_dtype`` was chosen by ``"auto"`` through the pairing rule.
        mp_policy: The FSDP2 policy for the blocks.
    """

    mode: PrecisionMode
    storage_dtype: torch.dtype | None
    storage_was_auto: bool
    mp_policy: MixedPrecisionPolicy

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.mp_policy.param_dtype or self.storage_dtype or self.mode.compute_dtype

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
    * The default policy for half precisions is NeMo AutoModel's: param (compute) dtype = the precision's half dtype,
      reduce dtype fp32, output dtype = the half dtype. Fields given in ``mp_policy`` override it.

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
            ``output_dtype`` against the precision's compute dtype; a half ``storage_dtype`` that is not the compute
            half dtype (fp16 storage with bf16 compute would re-round every parameter on each gather).
    """
    mode = (
        get_mode(precision, what="FSDP2Strategy precision") if not isinstance(precision, PrecisionMode) else precision
    )
    explicit = parse_dtype(storage_dtype, what="FSDP2Strategy(storage_dtype=...)")
    try:
        storage = resolve_storage_dtype({"torch_dtype": explicit}, optimizer, peft=peft, precision=mode)
    except PrecisionConfigError as err:
        raise PrecisionConfigError(f"FSDP2Strategy(storage_dtype={storage_dtype!r}): {err}") from err
    given = parse_mp_policy(mp_policy)
    half = mode.half_dtype
    for key in ("param_dtype", "output_dtype"):
        value = given[key]
        expected = half or mode.compute_dtype
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
            output_dtype=given["output_dtype"] or half,
            cast_forward_inputs=cast,
        )
        if storage in HALF_DTYPES and storage != half:
            raise PrecisionConfigError(
                f"FSDP2Strategy(storage_dtype={dtype_name(storage)}) with precision={mode.name!r} (compute "
                f"{dtype_name(half)}): parameters stored in one half dtype and computed in the other are re-rounded on "
                f"every gather. Use storage_dtype={dtype_name(half)}, float32, or auto."
            )
    return FSDP2Precision(
        mode=mode,
        storage_dtype=storage,
        storage_was_auto=explicit is None and mode.storage_dtype is None,
        mp_policy=policy,
    )


def _for(dtype: torch.dtype) -> str:
    return "'16-mixed', '16-true'" if dtype == torch.float16 else "'32-true'"


class _PolicyMixedPrecision(MixedPrecision):
    """Lightning's mixed precision without ``torch.autocast``: FSDP2's policy already runs the blocks in half
    precision, and autocast on top would re-cast every matmul's inputs a second time. The gradient scaler (fp16) is
    kept."""

    @override
    def forward_context(self) -> AbstractContextManager:
        return nullcontext()


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, ``fully_shard``) with a mixed-precision policy and a storage dtype that is
    safe for the optimizer.

    Differences from Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`:

    * Pure data parallelism by default: data-parallel size = world size (``num_nodes`` x devices), tensor-parallel
      size 1.
    * If ``configure_model`` does not shard (or does not exist), the strategy shards: each block, each remaining
      top-level module, then the LightningModule as root (see :func:`~lightning_precision.strategies.parallelize`).
      A model already sharded in ``configure_model`` is respected and not sharded again; the strategy then applies
      neither ``storage_dtype`` nor ``mp_policy`` to it.
    * The storage dtype is cast *before* sharding, and the precision plugin's ``convert_module`` is never applied to
      the sharded DTensor parameters. Lightning's ``bf16-mixed`` plugin does not autocast on top of the policy
      unless ``autocast=True``.
    * After the optimizers exist, the real pairing on the sharded parameters is judged (``on_unsafe``). When
      ``"auto"`` fell back to fp32 for an optimizer that keeps its own master weights, that memory cost is logged.
    * Checkpoints record the storage dtype and policy; resuming into another storage dtype is logged (upcast) or
      warned about (downcast).

    Precision mapping: ``bf16-mixed`` -> fp32 storage (auto, for torch optimizers) + bf16 compute; ``bf16-true`` ->
    bf16 storage + compute; ``bf16-flash`` -> bf16 storage via ``flashoptim.cast_model`` + bf16 compute;
    ``32-true`` -> no mixed precision.

    Args:
        storage_dtype: Dtype of the resident sharded parameters. ``"auto"`` asks the pairing rule
            (:func:`~lightning_precision.pairing.resolve_storage_dtype`) with the optimizer known from ``optimizer``
            or from :func:`~lightning_precision.config.resolve_trainer_cfg`; fp32 if the optimizer is not known.
        mp_policy: A ``MixedPrecisionPolicy`` or a mapping of its fields. Unset fields follow the precision (for half
            precisions: param dtype = half, reduce dtype fp32, output dtype = half).
        optimizer: The optimizer the LightningModule will create (class, import path, or ``_target_``/``class_path``
            mapping), so ``"auto"`` can decide before the optimizer exists.
        blocks: Which modules are FSDP units: ``None`` (children of ``nn.ModuleList``), class names, or a callable
            ``(name, module) -> bool``.
        reshard_after_forward: Free gathered block parameters after forward (``True``, ZeRO-3) or keep them until
            backward (``False``).
        autocast: Also run Lightning's ``torch.autocast`` under ``*-mixed`` precisions. Off by default: the policy
            does the casting.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe storage/optimizer pairing. ``None``: the
            value from ``resolve_trainer_cfg``, else ``"warn"``.
        peft: Only adapters train: storage is left to the model and the pairing is not judged.
        data_parallel_size: ``"auto"`` (world size / tensor-parallel size) or an int.
        tensor_parallel_size: Tensor-parallel size (default 1). With more than 1, apply tensor parallelism yourself in
            ``configure_model``.
        save_distributed_checkpoint: Save a sharded checkpoint directory (``True``) or one full file (``False``).
        process_group_backend: As in ``ModelParallelStrategy``.
        timeout: As in ``ModelParallelStrategy``.

    Raises:
        PrecisionConfigError: On an invalid ``storage_dtype``, ``mp_policy``, ``optimizer``, ``blocks`` or
            ``on_unsafe`` (conflicts between options are found in ``setup``, once the precision plugin is known).
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        storage_dtype: torch.dtype | str = "auto",
        mp_policy: MixedPrecisionPolicy | Mapping[str, Any] | None = None,
        optimizer: Any = None,
        blocks: BlockSelector = None,
        reshard_after_forward: bool = True,
        autocast: bool = False,
        on_unsafe: OnUnsafe | None = None,
        peft: bool = False,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        parse_dtype(storage_dtype, what="FSDP2Strategy(storage_dtype=...)")
        parse_mp_policy(mp_policy)
        if optimizer is not None:
            classify_optimizer(optimizer)  # fails early on something that names no optimizer
        block_selector(blocks)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise PrecisionConfigError(
                f"FSDP2Strategy(tensor_parallel_size={tensor_parallel_size!r}) is not valid: give an int >= 1."
            )
        self.storage_dtype_option = storage_dtype
        self.mp_policy_option = mp_policy
        self.optimizer_hint = optimizer
        self.blocks = blocks
        self.reshard_after_forward = bool(reshard_after_forward)
        self.autocast = bool(autocast)
        self._on_unsafe_given = on_unsafe is not None
        self.on_unsafe: OnUnsafe = validate_on_unsafe(
            on_unsafe if on_unsafe is not None else "warn", what="FSDP2Strategy: on_unsafe"
        )
        self.peft = bool(peft)
        self.resolved: FSDP2Precision | None = None
        self.sharded_by_strategy = False

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="FSDP2 with fp32 storage for torch optimizers, bf16 compute and fp32 reduction by default",
        )

    # -- what the guard's contract table reads -----------------------------------------------------------------------

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """Resident parameter dtype (known after ``setup``)."""
        return self.resolved.storage_dtype if self.resolved else None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """Forward/backward dtype inside the FSDP units (known after ``setup``)."""
        return self.resolved.compute_dtype if self.resolved else None

    @property
    def reduce_dtype(self) -> torch.dtype | None:
        """Gradient reduce-scatter dtype (known after ``setup``)."""
        return self.resolved.reduce_dtype if self.resolved else None

    @property
    def mp_policy(self) -> MixedPrecisionPolicy | None:
        """The resolved policy applied to the blocks (known after ``setup``)."""
        return self.resolved.mp_policy if self.resolved else None

    def apply_resolved_config(
        self, kwargs: Any, *, optimizer: Any = None, peft: bool = False, model: Mapping[str, Any] | None = None
    ) -> FSDP2Precision:
        """Learn from :func:`~lightning_precision.config.resolve_trainer_cfg` what the strategy cannot see yet.

        The optimizer is created after sharding, so its config is the only way ``storage_dtype="auto"`` can know it.
        Options given to the strategy itself win.

        Args:
            kwargs: The resolved ``TrainerKwargs`` (its ``on_unsafe`` is adopted unless the strategy was given one).
            optimizer: The optimizer section.
            peft: Whether only adapters train.
            model: The model section: an explicit ``torch_dtype`` there is the storage dtype when the strategy's own
                ``storage_dtype`` is ``"auto"``.

        Returns:
            What the strategy will do under the config's precision (Lightning's ``32-true`` when it sets none), so the
            config can be judged and explained before anything runs.

        Raises:
            PrecisionConfigError: If the strategy's options contradict the precision.
        """
        explicit = parse_dtype((model or {}).get("torch_dtype"), what="model.torch_dtype")
        if explicit is not None and parse_dtype(self.storage_dtype_option) is None:
            self.storage_dtype_option = explicit
        if self.optimizer_hint is None and optimizer is not None:
            classify_optimizer(optimizer)
            self.optimizer_hint = optimizer
        self.peft = self.peft or bool(peft)
        if not self._on_unsafe_given and getattr(kwargs, "on_unsafe", None) is not None:
            self.on_unsafe = validate_on_unsafe(kwargs.on_unsafe)
        return self.decide(getattr(kwargs, "precision_mode", None) or get_mode("32-true"))

    # -- setup ---------------------------------------------------------------------------------------------------------

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # Pure data parallelism: every process holds one shard (Lightning's default would be tensor parallel).
            self._data_parallel_size = max(1, (self.num_nodes * self.num_processes) // self._tensor_parallel_size)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        if any(isinstance(mod, FullyShardedDataParallel) for mod in self.model.modules()):
            raise TypeError(
                "Found modules wrapped with `torch.distributed.fsdp.FullyShardedDataParallel` (FSDP1). "
                f"`{type(self).__name__}` only supports FSDP2 (`fully_shard`)."
            )
        self.resolved = self._resolve_precision()
        self._disable_autocast_unless_asked()

        if is_sharded(self.model):
            self.sharded_by_strategy = False
            info_rank_zero(
                f"{type(self).__name__}: configure_model already applied fully_shard; the model is not sharded again, "
                "and storage_dtype / mp_policy are left as configure_model set them."
            )
        else:
            self._cast_storage(self.model)  # before sharding: the plugin must never re-cast DTensor shards
            units = parallelize(
                self.model,
                self.device_mesh["data_parallel"],
                self.resolved.mp_policy,
                blocks=self.blocks,
                reshard_after_forward=self.reshard_after_forward,
            )
            self.sharded_by_strategy = True
            info_rank_zero(
                f"{type(self).__name__}: sharded {len(units) - 1} modules and the root over "
                f"{self.device_mesh['data_parallel'].size()} data-parallel ranks; storage "
                f"{dtype_name(self.storage_dtype)}{' (auto)' if self.resolved.storage_was_auto else ''}, compute "
                f"{dtype_name(self.compute_dtype)}, reduce {dtype_name(self.reduce_dtype)}."
            )

        _materialize_distributed_module(self.model, self.root_device)
        self.model_to_device()
        self.barrier()

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            # Every rank judges the same inputs, so under on_unsafe="error" every rank raises here, before any
            # collective of the first step: no rank is left waiting.
            self.check_pairing(self.optimizers)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _resolve_precision(self) -> FSDP2Precision:
        name = getattr(self.precision_plugin, "precision", None)
        try:
            mode = get_mode(name, what="precision")
        except PrecisionConfigError as err:
            raise PrecisionConfigError(
                f"{type(self).__name__} does not support precision={name!r}. Choose one of: '32-true', 'bf16-mixed', "
                "'bf16-true', 'bf16-flash' (or their fp16 forms)."
            ) from err
        return self.decide(mode)

    def decide(self, mode: PrecisionMode) -> FSDP2Precision:
        """Storage dtype and policy under ``mode`` with this strategy's options (see :func:`resolve_fsdp2_precision`)."""
        return resolve_fsdp2_precision(
            mode,
            storage_dtype=self.storage_dtype_option,
            mp_policy=self.mp_policy_option,
            optimizer=self.optimizer_hint,
            peft=self.peft,
        )

    def _disable_autocast_unless_asked(self) -> None:
        plugin = self.precision_plugin
        if self.autocast or type(plugin) is not MixedPrecision:
            return
        replacement = _PolicyMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
        self.precision_plugin = replacement

    def _cast_storage(self, model: nn.Module) -> None:
        assert self.resolved is not None
        storage = self.resolved.storage_dtype
        if storage is None:  # PEFT: the model keeps what it was loaded in
            return
        if self.resolved.mode.family in ("true", "flash"):
            # The plugin's own cast (flashoptim.cast_model keeps normalization layers fp32; HalfPrecision casts all),
            # applied while the parameters are still plain tensors.
            self.precision_plugin.convert_module(model)
            return
        cast = 0
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)
                cast += 1
        if cast:
            info_rank_zero(f"{type(self).__name__}: cast {cast} parameters to storage dtype {dtype_name(storage)}.")

    def check_pairing(self, optimizers: list[torch.optim.Optimizer]) -> list[Verdict]:
        """Judge each live optimizer on the sharded parameters with the pairing rule and act under ``on_unsafe``.

        Raises:
            PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        """
        assert self.resolved is not None
        # Telling the rule that "auto" chose the storage makes fp32 with a master-keeping optimizer WASTEFUL.
        return check_and_enforce(
            optimizers,
            on_unsafe=self.on_unsafe,
            peft=self.peft,
            where=type(self).__name__,
            storage_was_auto=self.resolved.storage_was_auto,
        )

    # -- steps: the LightningModule is the FSDP root, so its forward hooks must run --------------------------------

    def _step(self, method: str, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        assert module is not None
        if isinstance(module, FSDPModule):
            # Route the step through the root's forward: FSDP2 initializes, gathers the root's parameters and
            # schedules the gradient reduction from its forward hooks, which a direct training_step call skips.
            return self._forward_redirection(module, module, method, *args, **kwargs)
        return getattr(module, method)(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.train_step_context():
            return self._step("training_step", *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.val_step_context():
            return self._step("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.test_step_context():
            return self._step("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._step("predict_step", *args, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Save as ``ModelParallelStrategy`` does, into a hidden staging path that is renamed onto ``filepath`` only
        once every rank has written.

        Lightning writes a sharded checkpoint straight into ``filepath``. When that directory already holds a
        checkpoint (``last.ckpt`` with ``save_last=True`` is rewritten in place), a rank that dies mid-save leaves the
        previous ``.metadata`` and ``meta.pt`` next to a mix of new and old shard files: a directory that loads
        without error but holds parameters from two different steps. Staging keeps ``filepath`` either the previous
        complete checkpoint or the new complete one; an interrupted save leaves only ``.<name>.incomplete``, which
        neither Lightning's ``ckpt_path="last"`` nor ``ModelCheckpoint`` take for a checkpoint.
        """
        if self.resolved is not None:
            checkpoint[CHECKPOINT_KEY] = self.resolved.to_dict()
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # raises TypeError
        path = Path(self.broadcast(filepath))
        if path.is_dir() and not self._save_distributed_checkpoint and not _is_sharded_checkpoint(path):
            raise IsADirectoryError(f"The checkpoint path exists and is a directory: {path}")
        staging = path.with_name(f".{path.name}.incomplete")
        if self.is_global_zero:
            _remove_path(staging)  # left over from an interrupted save
            path.parent.mkdir(parents=True, exist_ok=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging)
        self.barrier()  # every rank has written its part (DCP writes .metadata last, after gathering all ranks)
        if self.is_global_zero:
            _replace_path(staging, path)
        self.barrier()
        return None

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.report_resume(checkpoint.get(CHECKPOINT_KEY), Path(checkpoint_path))
        return checkpoint

    def report_resume(self, saved: Mapping[str, Any] | None, path: Path | None = None) -> None:
        """Say what a resume did to the storage dtype (see :func:`report_storage_change`): never silent."""
        current = self.storage_dtype
        recorded = (saved or {}).get("storage_dtype")
        if current is None or recorded in (None, "-"):
            return
        where = f" from {path}" if path else ""
        what = f"{type(self).__name__} checkpoint{where}"
        report_storage_change(parse_dtype(recorded, what="checkpoint storage_dtype"), current, what=what)


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _replace_path(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` onto ``path`` (a file or a directory, replacing either) by renames."""
    if not (path.exists() or path.is_symlink()):
        staging.rename(path)
        return
    if staging.is_file() and path.is_file() and not path.is_symlink():
        os.replace(staging, path)  # atomic
        return
    # A directory cannot atomically replace a non-empty one: set the old one aside first. A crash between the two
    # renames leaves the old checkpoint complete under .<name>.replaced and the new one under .<name>.incomplete.
    replaced = path.with_name(f".{path.name}.replaced")
    _remove_path(replaced)
    path.rename(replaced)
    staging.rename(path)
    _remove_path(replaced)


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    FSDP2Strategy.register_strategies(StrategyRegistry)
