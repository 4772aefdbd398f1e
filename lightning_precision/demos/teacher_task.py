"""Built-in training task used by ``lightning-precision compare``, the tests and the benchmarks.

The task is a small regression: a student MLP learns to imitate a fixed random "teacher" network. It is tiny
enough to run thousands of optimizer steps on a CPU in seconds, and it converges to a low loss only when the
optimizer can apply small updates precisely. That makes the bf16 optimizer-state trap visible: AdamW on bf16
parameters (``precision="bf16-true"``) rounds small updates away and plateaus well above the fp32 reference,
while bf16 autocast with fp32 weights (``precision="bf16-mixed"``) matches the reference.

Everything is generated from a seed; nothing is downloaded. Inputs and targets are rounded to bf16-representable
values when generated, so casting a batch to bf16 does not change the data: every recipe sees exactly the same
numbers, and any difference in final loss comes from how the model is stored, computed and optimized.

Batches are dicts ``{"x": ..., "audio_features": ..., "y": ...}``. The ``audio_features`` key carries part of the
input; the model casts it to its own compute dtype itself, so input casting that keeps audio in fp32 is exercised.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_precision._imports import import_object
from lightning_precision.config_classes import construct
from lightning_precision.values import parse_number

AUDIO_KEY = "audio_features"
"""Name of the optional float input that input casting should leave in its original dtype."""

DEFAULT_MAX_STEPS = 2000
"""Training steps of the default configuration (pass as ``Trainer(max_steps=...)``).

With the constructor defaults of :class:`TaskModule` and :class:`TaskDataModule`, this many steps of
``torch.optim.AdamW`` end, on seeds 0-2, with a ``bf16-true`` loss several times the ``32-true`` loss and a
``bf16-mixed`` loss within 1% of it (see ``benchmarks/trap_search.py``)."""

DEFAULT_LAST_K = 100
"""Number of final steps averaged into the "final loss" of a run (see :meth:`TaskModule.final_loss`)."""


def _round_to_bf16(t: Tensor) -> Tensor:
    """Returns ``t`` in fp32 with every value rounded to the nearest bf16-representable number."""
    return t.to(torch.bfloat16).to(torch.float32)


def make_teacher_data(
    num_samples: int = 2048,
    in_features: int = 16,
    audio_features: int = 8,
    out_features: int = 4,
    teacher_hidden: int = 32,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Generates a deterministic regression data set from a fixed random tanh "teacher" network.

    The teacher computes ``y = W2 @ tanh(W1 @ [x, audio] + b1) + b2`` with weights drawn from a generator seeded by
    ``seed``. Inputs are standard normal. All returned tensors are fp32 but hold bf16-representable values, so a
    cast to bf16 is lossless.

    Args:
        num_samples: Number of examples.
        in_features: Width of the ``"x"`` input.
        audio_features: Width of the ``"audio_features"`` input; 0 leaves the key out.
        out_features: Width of the target ``"y"``.
        teacher_hidden: Hidden width of the teacher network.
        seed: Seed for inputs and teacher weights. The same seed always gives identical tensors.

    Returns:
        A dict with ``"x"`` of shape ``(num_samples, in_features)``, ``"y"`` of shape
        ``(num_samples, out_features)`` and, when ``audio_features > 0``, ``"audio_features"`` of shape
        ``(num_samples, audio_features)``.
    """
    if num_samples <= 0 or in_features <= 0 or out_features <= 0 or teacher_hidden <= 0 or audio_features < 0:
        raise ValueError("make_teacher_data: sizes must be positive (audio_features may be 0)")
    gen = torch.Generator().manual_seed(seed)
    total_in = in_features + audio_features
    x = _round_to_bf16(torch.randn(num_samples, in_features, generator=gen))
    audio = _round_to_bf16(torch.randn(num_samples, audio_features, generator=gen))
    w1 = torch.randn(total_in, teacher_hidden, generator=gen) / math.sqrt(total_in)
    b1 = 0.1 * torch.randn(teacher_hidden, generator=gen)
    w2 = torch.randn(teacher_hidden, out_features, generator=gen) / math.sqrt(teacher_hidden)
    b2 = 0.1 * torch.randn(out_features, generator=gen)
    # The teacher runs in fp64 so the targets do not depend on the machine's fp32 matmul kernels.
    inputs = torch.cat([x, audio], dim=1).double()
    y = torch.tanh(inputs @ w1.double() + b1.double()) @ w2.double() + b2.double()
    data = {"x": x, "y": _round_to_bf16(y.float())}
    if audio_features > 0:
        data[AUDIO_KEY] = audio
    return data


class TensorDictDataset(Dataset):
    """A map-style data set over a dict of equally long tensors, indexed by a list of rows.

    Indexing with a list of indices returns a whole batch at once (a dict of tensors), which avoids per-sample
    collation; use it with a :class:`~torch.utils.data.BatchSampler` and ``batch_size=None``.

    Args:
        data: Dict of tensors that share their first dimension.
    """

    def __init__(self, data: dict[str, Tensor]) -> None:
        lengths = {len(t) for t in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"TensorDictDataset: tensors must share their first dimension, got lengths {lengths}")
        self.data = data
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | list[int]) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.data.items()}


def make_dataloader(data: dict[str, Tensor], batch_size: int = 128, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """Builds a single-process dataloader with a reproducible data order.

    With ``shuffle=True`` the order comes from a generator seeded by ``seed``: two loaders built with the same
    arguments yield identical batches in identical order, epoch after epoch.

    Args:
        data: Dict of tensors that share their first dimension (e.g. from :func:`make_teacher_data`).
        batch_size: Rows per batch. The last, smaller batch of an epoch is dropped so every step sees the same
            batch size.
        shuffle: Whether to reshuffle every epoch.
        seed: Seed of the shuffling generator.

    Returns:
        A :class:`~torch.utils.data.DataLoader` that yields dict batches.
    """
    dataset = TensorDictDataset(data)
    if batch_size <= 0 or batch_size > len(dataset):
        raise ValueError(f"make_dataloader: batch_size must be in [1, {len(dataset)}], got {batch_size}")
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=True)
    return DataLoader(dataset, sampler=batch_sampler, batch_size=None, num_workers=0)


class TaskDataModule(pl.LightningDataModule):
    """Lightning data module for the teacher regression task.

    Args:
        num_samples: Number of training examples.
        in_features: Width of the ``"x"`` input.
        audio_features: Width of the ``"audio_features"`` input; 0 leaves the key out.
        out_features: Width of the target.
        teacher_hidden: Hidden width of the teacher network.
        batch_size: Rows per batch.
        data_seed: Seed of the inputs and teacher weights.
        shuffle_seed: Seed of the data order.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        in_features: int = 16,
        audio_features: int = 8,
        out_features: int = 4,
        teacher_hidden: int = 32,
        batch_size: int = 128,
        data_seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = {"num_samples": (num_samples, 1), "in_features": (in_features, 1), "out_features": (out_features, 1)}
        sizes.update(audio_features=(audio_features, 0), teacher_hidden=(teacher_hidden, 1))
        for name, (value, low) in sizes.items():
            parse_number(value, what=f"TaskDataModule({name}=...)", integer=True, low=low)
        # drop_last keeps whole batches only: a batch larger than the data set would give no step at all.
        parse_number(batch_size, what="TaskDataModule(batch_size=...)", integer=True, low=1, high=num_samples)
        self.save_hyperparameters()
        self.data: dict[str, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generates the data set (once)."""
        if self.data is None:
            hp = self.hparams
            self.data = make_teacher_data(
                num_samples=hp.num_samples,
                in_features=hp.in_features,
                audio_features=hp.audio_features,
                out_features=hp.out_features,
                teacher_hidden=hp.teacher_hidden,
                seed=hp.data_seed,
            )

    def train_dataloader(self) -> DataLoader:
        """Returns the shuffled training loader with a fixed order."""
        self.setup()
        hp = self.hparams
        return make_dataloader(self.data, batch_size=hp.batch_size, shuffle=True, seed=hp.shuffle_seed)


def resolve_target(target: str) -> Any:
    """Imports the object named by a dotted path such as ``"torch.optim.AdamW"``.

    Raises:
        ValueError: (:class:`~lightning_precision.errors.PrecisionConfigError`) if it does not import; the message
            names ``target``.
    """
    return import_object(target, where="optimizer")


def build_optimizer(
    params: Any,
    optimizer: str | type | dict[str, Any],
    lr: float,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Builds an optimizer from a class, a dotted ``_target_`` string or a Hydra-style dict.

    Args:
        params: Parameters (or parameter groups) to optimize.
        optimizer: An optimizer class (e.g. ``torch.optim.AdamW``), a dotted path (e.g.
            ``"lightning_precision.optim.CompensatedAdamW"``, imported only here), or a dict with a ``"_target_"``
            key and further keyword arguments.
        lr: Learning rate; pass it here, not in ``optimizer_kwargs``.
        optimizer_kwargs: Extra keyword arguments for the optimizer (e.g. ``{"weight_decay": 0.0}``). They override
            keys of the same name in a dict ``optimizer``.

    Returns:
        The optimizer instance.

    Raises:
        ValueError: If ``_target_`` cannot be resolved, does not name a callable, ``lr`` is given twice, or the
            optimizer rejects the arguments.
    """
    kwargs = dict(optimizer_kwargs or {})
    if isinstance(optimizer, dict):
        spec = dict(optimizer)
        if "_target_" not in spec:
            raise ValueError(f"optimizer dict needs a '_target_' key, got keys {sorted(spec)}")
        optimizer = spec.pop("_target_")
        kwargs = {**spec, **kwargs}
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__qualname__", repr(optimizer))
    if isinstance(optimizer, str):
        optimizer = resolve_target(optimizer)
    if not callable(optimizer):
        # A bad _target_ is a configuration error: report it like the other bad-_target_ cases.
        raise ValueError(f"bad _target_ {name!r}: resolved to a non-callable {optimizer!r}")  # noqa: TRY004
    if "lr" in kwargs:
        raise ValueError(f"pass the learning rate as `lr`, not in the optimizer kwargs (got lr={kwargs['lr']!r})")
    args = {"lr": lr, **kwargs}
    return construct(lambda **kw: optimizer(params, **kw), args, where="optimizer", name=name)


def cosine_lr_lambda(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then cosine decay to ``min_lr_ratio``.

    Args:
        step: Optimizer step, starting at 0.
        total_steps: Step at which the decay reaches ``min_lr_ratio``; later steps stay there.
        warmup_steps: Steps of linear warmup from ``1 / warmup_steps`` to 1.
        min_lr_ratio: Final multiplier.

    Returns:
        The multiplier, in ``(0, 1]``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TaskModule(pl.LightningModule):
    """Student MLP trained to imitate the teacher, with a configurable optimizer and a cosine schedule.

    The model is ``Linear -> tanh -> ... -> Linear``. The ``"audio_features"`` input, when present, is cast to the
    dtype of the first layer's weight inside :meth:`forward`, so it works whether or not input casting left it in
    fp32. The loss is mean squared error computed in fp32.

    Every training step logs ``train_loss`` and appends the loss (a Python float) to :attr:`step_losses`.

    Args:
        in_features: Width of the ``"x"`` input.
        audio_features: Width of the ``"audio_features"`` input (0 if the batches have none).
        out_features: Width of the target.
        hidden: Hidden width of the student.
        depth: Number of hidden layers (at least 1).
        optimizer: Optimizer class, dotted ``_target_`` string, or dict with ``"_target_"`` (see
            :func:`build_optimizer`).
        optimizer_kwargs: Extra optimizer keyword arguments (not ``lr``).
        lr: Peak learning rate.
        weight_decay: Weight decay passed to the optimizer unless ``optimizer_kwargs`` sets it.
        warmup_steps: Steps of linear learning-rate warmup.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        total_steps: Length of the cosine schedule; ``None`` uses the trainer's estimated number of steps.
        init_seed: Seed of the student's initial weights, so every recipe starts from the same weights.
        fp32_head: Run the output layer outside autocast, in the dtype of its own weight. Under ``bf16-mixed`` this
            keeps the predictions in fp32 instead of rounding them to bf16, which would add an error floor of
            about ``(2**-9 * |y|)**2`` to the loss. It changes nothing for ``32-true`` or ``bf16-true``.
    """

    def __init__(
        self,
        in_features: int = 16,
        audio_features: int = 8,
        out_features: int = 4,
        hidden: int = 64,
        depth: int = 1,
        optimizer: str | type | dict[str, Any] = "torch.optim.AdamW",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        init_seed: int = 0,
        fp32_head: bool = True,
    ) -> None:
        super().__init__()
        sizes = {"in_features": (in_features, 1), "audio_features": (audio_features, 0), "hidden": (hidden, 1)}
        sizes.update(out_features=(out_features, 1), depth=(depth, 1), warmup_steps=(warmup_steps, 0))
        for name, (value, low) in sizes.items():
            parse_number(value, what=f"TaskModule({name}=...)", integer=True, low=low)
        parse_number(min_lr_ratio, what="TaskModule(min_lr_ratio=...)", low=0, high=1)
        if total_steps is not None:
            parse_number(total_steps, what="TaskModule(total_steps=...)", integer=True, low=1)
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            layers: list[nn.Module] = []
            width = in_features + audio_features
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.Tanh()]
                width = hidden
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, out_features)
        self.step_losses: list[float] = []

    def forward(self, x: Tensor, audio_features: Tensor | None = None) -> Tensor:
        """Predicts targets from ``x`` and, if the model was built with audio inputs, ``audio_features``.

        Args:
            x: Input of shape ``(batch, in_features)``.
            audio_features: Input of shape ``(batch, audio_features)``; any float dtype.

        Returns:
            Predictions of shape ``(batch, out_features)``.
        """
        compute_dtype = self.body[0].weight.dtype
        inputs = x.to(compute_dtype)
        if self.hparams.audio_features > 0:
            if audio_features is None:
                raise ValueError(f"this model expects a {AUDIO_KEY!r} input")
            inputs = torch.cat([inputs, audio_features.to(compute_dtype)], dim=1)
        hidden = self.body(inputs)
        if not self.hparams.fp32_head:
            return self.head(hidden)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(hidden.to(self.head.weight.dtype))

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error of the model on ``batch``, in fp32."""
        pred = self(batch["x"], batch.get(AUDIO_KEY))
        return F.mse_loss(pred.float(), batch["y"].float())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimization step on a dict batch; logs and records the loss."""
        loss = self.compute_loss(batch)
        self.step_losses.append(loss.item())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """Builds the optimizer from the constructor's spec and a per-step cosine schedule."""
        hp = self.hparams
        kwargs = {"weight_decay": hp.weight_decay, **(hp.optimizer_kwargs or {})}
        optimizer = build_optimizer(self.parameters(), hp.optimizer, lr=hp.lr, optimizer_kwargs=kwargs)
        total_steps = hp.total_steps if hp.total_steps is not None else int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_lr_lambda(step, total_steps, hp.warmup_steps, hp.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def final_loss(self, last_k: int = DEFAULT_LAST_K) -> float:
        """Mean of the last ``last_k`` recorded step losses (fewer if fewer were recorded).

        Raises:
            ValueError: If no step has been recorded.
        """
        if not self.step_losses:
            raise ValueError("no training step has been recorded")
        tail = self.step_losses[-last_k:]
        return sum(tail) / len(tail)
