"""Tests of the built-in training task (lightning_precision.demos.teacher_task)."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_precision.demos import (
    AUDIO_KEY,
    TaskDataModule,
    TaskModule,
    build_optimizer,
    cosine_lr_lambda,
    make_dataloader,
    make_teacher_data,
    resolve_target,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _one_thread():
    """The task's matmuls are tiny; extra threads only add contention (very slow on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(module: TaskModule, precision: str = "32-true", steps: int = 30, batch_size: int = 64) -> TaskModule:
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, TaskDataModule(num_samples=512, batch_size=batch_size))
    return module


def test_same_seed_gives_identical_data():
    a, b = make_teacher_data(seed=3), make_teacher_data(seed=3)
    assert a.keys() == b.keys() == {"x", "y", AUDIO_KEY}
    for key in a:
        assert torch.equal(a[key], b[key])


def test_different_seed_gives_different_data():
    a, b = make_teacher_data(seed=0), make_teacher_data(seed=1)
    for key in a:
        assert not torch.equal(a[key], b[key])


def test_data_shapes_and_bf16_exact_values():
    data = make_teacher_data(num_samples=100, in_features=5, audio_features=3, out_features=2)
    assert data["x"].shape == (100, 5) and data[AUDIO_KEY].shape == (100, 3) and data["y"].shape == (100, 2)
    for value in data.values():
        assert value.dtype == torch.float32
        assert torch.equal(value, value.to(torch.bfloat16).float())  # casting a batch to bf16 is lossless


def test_no_audio_key_when_audio_features_is_zero():
    assert AUDIO_KEY not in make_teacher_data(audio_features=0)


def test_dataloader_order_is_reproducible_and_seeded():
    data = make_teacher_data(num_samples=256)

    def first_epochs(seed: int) -> list[torch.Tensor]:
        loader = make_dataloader(data, batch_size=32, seed=seed)
        return [batch["x"] for _ in range(2) for batch in loader]

    same_a, same_b, other = first_epochs(0), first_epochs(0), first_epochs(1)
    assert len(same_a) == 16 and all(b.shape == (32, 16) for b in same_a)
    assert all(torch.equal(x, y) for x, y in zip(same_a, same_b))
    assert not torch.equal(same_a[0], other[0])
    assert not torch.equal(same_a[0], same_a[8])  # reshuffled on the second epoch


def test_module_loss_decreases_under_32_true():
    module = _fit(TaskModule(lr=1e-2), steps=40)
    assert len(module.step_losses) == 40
    assert sum(module.step_losses[-5:]) / 5 < 0.5 * sum(module.step_losses[:5]) / 5
    assert module.final_loss(5) == pytest.approx(sum(module.step_losses[-5:]) / 5)


def test_module_runs_under_bf16_true_with_fp32_audio():
    """Audio left in fp32 by input casting must still work with bf16 weights."""
    module = TaskModule().to(torch.bfloat16)
    batch = make_teacher_data(num_samples=8)
    out = module(batch["x"].to(torch.bfloat16), batch[AUDIO_KEY])
    assert out.dtype == torch.bfloat16 and out.shape == (8, 4)


def test_fp32_head_keeps_predictions_fp32_under_autocast():
    batch = make_teacher_data(num_samples=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert TaskModule()(batch["x"], batch[AUDIO_KEY]).dtype == torch.float32
        assert TaskModule(fp32_head=False)(batch["x"], batch[AUDIO_KEY]).dtype == torch.bfloat16


def test_runs_are_reproducible():
    a = _fit(TaskModule(), steps=10)
    b = _fit(TaskModule(), steps=10)
    assert a.step_losses == b.step_losses


@pytest.mark.parametrize(
    "spec",
    [torch.optim.AdamW, "torch.optim.AdamW", {"_target_": "torch.optim.AdamW", "betas": (0.8, 0.9)}],
    ids=["class", "target-string", "target-dict"],
)
def test_configure_optimizers_accepts_class_and_target(spec):
    module = TaskModule(optimizer=spec, optimizer_kwargs={"eps": 1e-7}, lr=0.01, total_steps=100)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["eps"] == 1e-7
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    if isinstance(spec, dict):
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert config["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize("target", ["no_such_module.AdamW", "torch.optim.NoSuchOptimizer", "AdamW", "torch.pi"])
def test_bad_target_raises_value_error_naming_it(target):
    module = TaskModule(optimizer=target, total_steps=10)
    with pytest.raises(ValueError, match=target.replace(".", r"\.")):
        module.configure_optimizers()


def test_lr_in_kwargs_is_rejected():
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(TaskModule().parameters(), "torch.optim.AdamW", lr=1e-3, optimizer_kwargs={"lr": 1.0})


def test_resolve_target_returns_object():
    assert resolve_target("torch.optim.SGD") is torch.optim.SGD


def test_cosine_schedule_shape():
    assert cosine_lr_lambda(0, 100) == pytest.approx(1.0)
    assert cosine_lr_lambda(50, 100, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert cosine_lr_lambda(100, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr_lambda(500, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr_lambda(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr_lambda(10, 100, warmup_steps=10) == pytest.approx(1.0)
