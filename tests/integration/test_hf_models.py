"""Hugging Face models built from tiny configs, as users bring them: Llama under FSDP2 on 2 ranks, Wav2Vec2 under
bf16-true with its convolutional front end kept in fp32. Needs ``transformers`` (a test extra)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_precision import HalfPrecisionForAudio, PrecisionGuard
from tests.helpers import QUIET_TRAINER
from tests.strategies._launch import launch, rank_results

transformers = pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e '.[test]')")

WORKER = Path(__file__).with_name("_hf_worker.py")


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Fit on 2 ranks and save; then resume that sharded checkpoint on 1 rank."""
    out = tmp_path_factory.mktemp("llama")
    fit = rank_results(launch(WORKER, "fit", out, nproc=2), "fit", nproc=2)
    resume = rank_results(launch(WORKER, "resume", out, nproc=1), "resume", nproc=1)
    return {"fit": fit, "resume": resume}


@pytest.mark.distributed
def test_llama_under_fsdp2_keeps_tied_embeddings_and_fp32_storage(llama_runs):
    for rank in llama_runs["fit"]:
        assert rank["tied"] is True and rank["is_dtensor"] is True
        assert (rank["storage"], rank["compute"]) == (["float32"], "bfloat16")
        assert rank["losses_finite"] is True and rank["checkpoint_is_dir"] is True


@pytest.mark.distributed
def test_llama_loss_comes_out_in_fp32_as_under_bf16_mixed(llama_runs):
    for rank in llama_runs["fit"] + llama_runs["resume"]:
        assert rank["loss_dtypes"] == ["float32"]


@pytest.mark.distributed
def test_llama_checkpoint_from_2_ranks_resumes_exactly_on_1(llama_runs):
    (rank,) = llama_runs["resume"]
    assert (rank["world_size"], rank["global_step"]) == (1, 3)
    assert rank["restored_exactly"] is True and rank["tied"] is True


class Wav2Vec2Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.Wav2Vec2Config(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(16, 16),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2,
            mask_time_prob=0.0,
            ctc_loss_reduction="mean",
            pad_token_id=0,
        )
        self.model = transformers.Wav2Vec2ForCTC(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_values=batch["input_values"], labels=batch["labels"])
        self.log("train_loss", out.loss, batch_size=len(batch["labels"]))
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit_wav2vec2(fp32_modules: list[str] | None) -> tuple[Wav2Vec2Module, pl.Trainer]:
    data = [{"input_values": torch.randn(800), "labels": torch.randint(1, 16, (4,))} for _ in range(4)]
    plugin = HalfPrecisionForAudio("bf16-true", preserve_keys=["input_values"], fp32_modules=fp32_modules)
    trainer = pl.Trainer(**QUIET_TRAINER, max_steps=2, plugins=[plugin], callbacks=[PrecisionGuard(on_unsafe="ignore")])
    module = Wav2Vec2Module()
    trainer.fit(module, DataLoader(data, batch_size=2))
    return module, trainer


def test_wav2vec2_fails_on_fp32_audio_when_its_front_end_is_cast():
    with pytest.raises(RuntimeError, match="Input type .* and weight type"):
        _fit_wav2vec2(None)


def test_wav2vec2_trains_with_its_feature_extractor_in_fp32():
    module, trainer = _fit_wav2vec2(["model.wav2vec2.feature_extractor"])
    assert {p.dtype for p in module.model.wav2vec2.feature_extractor.parameters()} == {torch.float32}
    assert {p.dtype for p in module.model.lm_head.parameters()} == {torch.bfloat16}
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert trainer.callbacks[0].contract.fp32_modules == ["model.wav2vec2.feature_extractor"]


def test_wav2vec2_with_an_fp32_front_end_sums_its_micro_batches_in_fp32():
    """A speech model with dict batches, an fp32 feature extractor and bf16 elsewhere, 2 micro-batches per step: the
    bf16 parameters go through the fp32 buffers, the fp32 ones stay with autograd, and every gradient reaches the step."""
    seen: list[dict[str, torch.dtype | None]] = []

    class GradDtypes(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append({n: None if p.grad is None else p.grad.dtype for n, p in pl_module.named_parameters()})

    data = [{"input_values": torch.randn(800), "labels": torch.randint(1, 16, (4,))} for _ in range(8)]
    plugin = HalfPrecisionForAudio(
        "bf16-true", preserve_keys=["input_values"], fp32_modules=["model.wav2vec2.feature_extractor"],
        accumulate_grad_dtype="float32", on_unsafe="ignore",
    )  # fmt: skip
    guard = PrecisionGuard(on_unsafe="ignore")
    trainer = pl.Trainer(**QUIET_TRAINER, max_steps=2, plugins=[plugin], callbacks=[guard, GradDtypes()],
                         accumulate_grad_batches=2)  # fmt: skip
    module = Wav2Vec2Module()
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert len(seen) == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])
    params = dict(module.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    for step in seen:
        assert {n for n, d in step.items() if d is not None} == trained
        assert all(d == params[n].dtype for n, d in step.items() if d is not None)
    assert guard.contract.accumulation_text == "2 micro-batches summed in float32"
    assert not plugin.grad_accumulator.pending
