"""FSDP2 with the safe precision pattern by default: fp32 storage for torch optimizers, bf16 compute, fp32 reduction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from typing_extensions import override

from lightning_precision._logging import info_rank_zero
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.fp32_modules import Fp32ModuleSelector, normalize_fp32_modules
from lightning_precision.grad_accumulation import Fp32GradAccumulator, parse_accumulate_grad_dtype, trainer_accumulates
from lightning_precision.modes import MODES, PrecisionMode, choices_text, get_mode
from lightning_precision.pairing import Verdict
from lightning_precision.policy import OnUnsafe, PolicyHolder, agreed_policy, check_and_enforce, trainer_components
from lightning_precision.strategies.checkpoint_staging import recover_trainer_checkpoints
from lightning_precision.strategies.fsdp2_checkpoints import FSDP2Checkpoints
from lightning_precision.strategies.fsdp2_plan import (
    FSDP2Precision,
    agreed_optimizer,
    parse_mp_policy,
    resolve_fsdp2_precision,
    storage_option,
)
from lightning_precision.strategies.parallelize import (
    BlockSelector,
    block_selector,
    cast_parameters,
    is_sharded,
    shard_in_storage_dtype,
)
from lightning_precision.strategies.policy_precision import without_autocast
from lightning_precision.values import parse_bool


class FSDP2Strategy(PolicyHolder, FSDP2Checkpoints, ModelParallelStrategy):
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
    * Checkpoints record the storage dtype and policy. A resume reads each tensor in its saved dtype, converts and
      checks the optimizer state, and logs (upcast) or warns about (downcast) a storage change: see ``fsdp2_resume``.

    Precision mapping: ``bf16-mixed`` -> fp32 storage (auto, for torch optimizers) + bf16 compute; ``bf16-true`` ->
    bf16 storage + compute; ``bf16-flash`` -> bf16 storage via ``flashoptim.cast_model`` + bf16 compute;
    ``32-true`` -> no mixed precision.

    Args:
        storage_dtype: Dtype of the resident sharded parameters. ``"auto"`` asks the pairing rule
            (:func:`~lightning_precision.pairing.resolve_storage_dtype`) with the optimizer known from ``optimizer``
            or from :func:`~lightning_precision.config.resolve_trainer_cfg`; fp32 if the optimizer is not known.
        mp_policy: A ``MixedPrecisionPolicy`` or a mapping of its fields. Unset fields follow the precision (for half
            precisions: param dtype = half, reduce dtype fp32, output dtype fp32 for what the model hands to
            ``training_step``, so the loss is fp32 as under ``bf16-mixed``; blocks hand on the compute dtype).
        optimizer: The optimizer the LightningModule will create (class, import path, or ``_target_``/``class_path``
            mapping), so ``"auto"`` can decide before the optimizer exists.
        blocks: Which modules are FSDP units: ``None`` (children of ``nn.ModuleList``), class names, or a callable
            ``(name, module) -> bool``.
        reshard_after_forward: Free gathered block parameters after forward (``True``, ZeRO-3) or keep them until
            backward (``False``).
        autocast: Also run Lightning's ``torch.autocast`` under ``*-mixed`` precisions. Off by default: the policy
            does the casting.
        on_unsafe: ``"warn"``, ``"error"`` or ``"ignore"`` for an unsafe storage/optimizer pairing. ``None``: the
            policy set by ``resolve_trainer_cfg`` or on another component of the Trainer, else ``"warn"``.
        peft: Only adapters train: storage is left to the model; the adapters are still judged by their dtype.
        fp32_modules: Submodules kept in fp32 (storage, inputs, math), handing their outputs on in the compute dtype:
            module-name patterns, class names or ``nn.Module`` types (see :mod:`lightning_precision.fp32_modules`).
            Each becomes its own FSDP unit that gathers in fp32.
        data_parallel_size: ``"auto"`` (world size / tensor-parallel size) or an int.
        tensor_parallel_size: Tensor-parallel size (default 1). With more than 1, apply tensor parallelism yourself in
            ``configure_model``.
        save_distributed_checkpoint: Save a sharded checkpoint directory (``True``) or one full file (``False``).
        process_group_backend: As in ``ModelParallelStrategy``.
        timeout: As in ``ModelParallelStrategy``.
        accumulate_grad_dtype: ``"float32"``: with half storage and ``accumulate_grad_batches > 1``, each
            micro-batch's reduce-scattered gradient shard is moved into an fp32 buffer (4 B per half parameter /
            world size) and the sum is handed to clipping and the optimizer, rounded once. ``None`` (default): FSDP2
            adds each shard into the half gradient, rounding the running sum every micro-batch. See
            :mod:`lightning_precision.grad_accumulation`.

    Raises:
        PrecisionConfigError: On an invalid ``storage_dtype``, ``mp_policy``, ``optimizer``, ``blocks``,
            ``accumulate_grad_dtype`` or ``on_unsafe`` (conflicts between options are found in ``setup``, once the precision plugin is known).
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
        fp32_modules: Fp32ModuleSelector | Sequence[Fp32ModuleSelector] | None = None,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        accumulate_grad_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=parse_bool(
                save_distributed_checkpoint, what="FSDP2Strategy(save_distributed_checkpoint=...)", spellings=True
            ),
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
        self._storage_dtype_given = storage_dtype
        self._model_torch_dtype: torch.dtype | None = None  # learned from a config's model section
        self.mp_policy_option = mp_policy
        self.optimizer_hint = optimizer
        self.blocks = blocks
        self.reshard_after_forward = parse_bool(
            reshard_after_forward, what="FSDP2Strategy(reshard_after_forward=...)", spellings=True
        )
        self.autocast = parse_bool(autocast, what="FSDP2Strategy(autocast=...)", spellings=True)
        self._init_policy(on_unsafe)
        self.peft = parse_bool(peft, what="FSDP2Strategy(peft=...)", spellings=True)
        self.fp32_modules = normalize_fp32_modules(fp32_modules, what="FSDP2Strategy(fp32_modules=...)")
        self.fp32_module_names: tuple[str, ...] = ()  # what setup kept in fp32, for the contract
        self.resolved: FSDP2Precision | None = None
        self.sharded_by_strategy = False
        self.accumulate_grad_dtype = parse_accumulate_grad_dtype(
            accumulate_grad_dtype, what="FSDP2Strategy(accumulate_grad_dtype=...)"
        )
        self.grad_accumulator = Fp32GradAccumulator(self.accumulate_grad_dtype) if self.accumulate_grad_dtype else None

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

    @property
    def storage_dtype_option(self) -> Any:
        """The explicit storage dtype the plan uses: the strategy's own, else a config's ``model.torch_dtype``, else
        ``"auto"``."""
        return storage_option(self._storage_dtype_given, self._model_torch_dtype)

    def learn_config(
        self,
        *,
        optimizer: Any = None,
        model_torch_dtype: Any = None,
        peft: bool = False,
        on_unsafe: OnUnsafe | None = None,
    ) -> None:
        """Record what :func:`~lightning_precision.config.resolve_trainer_cfg` knows and the strategy cannot see yet.

        The optimizer is created after sharding, so its config is the only way ``storage_dtype="auto"`` can know it.
        Nothing the strategy was given is overwritten: a different optimizer or policy is an error, and the
        strategy's own ``storage_dtype`` decides the resident dtype over how the model is loaded.

        Args:
            optimizer: The optimizer section.
            model_torch_dtype: The model section's ``torch_dtype``: the storage dtype when the strategy's own
                ``storage_dtype`` is ``"auto"``.
            peft: Whether only adapters train.
            on_unsafe: The config's explicit policy, if any.

        Raises:
            PrecisionConfigError: If the config names another optimizer or another policy than the strategy's own,
                or ``model_torch_dtype`` is not a dtype.
        """
        self._model_torch_dtype = parse_dtype(model_torch_dtype, what="model.torch_dtype")
        self.optimizer_hint = agreed_optimizer(self.optimizer_hint, optimizer)
        self.peft = self.peft or peft
        if on_unsafe is not None:
            agreed_policy(
                [e for e in (self.explicit_on_unsafe(), ("trainer.lightning_precision.on_unsafe", on_unsafe)) if e]
            )
            self._on_unsafe_config = on_unsafe

    def plan(self, mode: PrecisionMode) -> FSDP2Precision:
        """Storage decision and policy under ``mode`` with this strategy's options (see
        :func:`~lightning_precision.strategies.fsdp2_plan.resolve_fsdp2_precision`); changes nothing.

        Raises:
            PrecisionConfigError: If the strategy's options contradict the precision.
        """
        return resolve_fsdp2_precision(
            mode,
            storage_dtype=self.storage_dtype_option,
            mp_policy=self.mp_policy_option,
            optimizer=self.optimizer_hint,
            peft=self.peft,
        )

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
        self.adopt_on_unsafe(trainer_components(trainer))
        recover_trainer_checkpoints(trainer, self)  # saves killed mid-rename are finished, partial ones removed
        self.resolved = self._resolve_precision()
        self._disable_autocast_unless_asked()

        if is_sharded(self.model):
            self.sharded_by_strategy = False
            info_rank_zero(
                f"{type(self).__name__}: configure_model already applied fully_shard; the model is not sharded again, "
                "and storage_dtype / mp_policy are left as configure_model set them."
            )
        else:
            self.fp32_module_names = shard_in_storage_dtype(
                self.model,
                self.device_mesh["data_parallel"],
                self.resolved,
                cast_storage=self._cast_storage,  # before sharding: the plugin must never re-cast DTensor shards
                fp32_modules=self.fp32_modules,
                blocks=self.blocks,
                reshard_after_forward=self.reshard_after_forward,
                where=type(self).__name__,
            )
            self.sharded_by_strategy = True

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
        if self.grad_accumulator is not None:
            if getattr(self.precision_plugin, "grad_accumulator", None) is not None:
                raise PrecisionConfigError(
                    "accumulate_grad_dtype is set on both FSDP2Strategy and the precision plugin "
                    f"{type(self.precision_plugin).__name__}: set it on one of them."
                )
            self.grad_accumulator.attach(self.model.named_parameters(), active=lambda: trainer_accumulates(trainer))

    @override
    def teardown(self) -> None:
        # The fp32 buffers (keyed by the parameters) and the predicate reading this Trainer must not outlive the fit.
        if self.grad_accumulator is not None:
            self.grad_accumulator.release()
        super().teardown()

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self.grad_accumulator is not None and self.model is not None:
            # FSDP2 has reduce-scattered this micro-batch (fp32 under the default reduce dtype) and cast the shard to
            # the storage dtype; moving it out now keeps FSDP2 from adding the next one into it in half precision.
            self.grad_accumulator.collect(self.model.named_parameters())
            self.grad_accumulator.end_micro_batch()

    @override
    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.grad_accumulator is not None:
            closure = self.grad_accumulator.handing_over_after(closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _resolve_precision(self) -> FSDP2Precision:
        name = getattr(self.precision_plugin, "precision", None)
        try:
            mode = get_mode(name, what="precision")
        except PrecisionConfigError as err:
            raise PrecisionConfigError(
                f"{type(self).__name__} does not support precision={name!r}. Choose one of: {choices_text(tuple(MODES))}."
            ) from err
        return self.plan(mode)

    def _disable_autocast_unless_asked(self) -> None:
        if not self.autocast:
            self.precision_plugin = without_autocast(self.precision_plugin, type(self).__name__)

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
        cast_parameters(model, storage, where=type(self).__name__)

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
            precision=self.resolved.mode,
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


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    FSDP2Strategy.register_strategies(StrategyRegistry)
