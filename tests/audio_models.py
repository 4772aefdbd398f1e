"""Speech models as users bring them, built tiny for the audio preset tests: Hugging Face Whisper and Wav2Vec2 from
tiny configs (no weights downloaded; ``transformers`` is a test extra), and a NeMo-style ASR LightningModule with a
mel ``preprocessor`` and ``(input_signal, input_signal_length, targets, target_length)`` batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

VOCAB = 16


def whisper() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB * 4, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config)


def whisper_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Log-mel features (8 bins x 16 frames: twice max_source_positions, as Whisper requires) and labels."""
    g = torch.Generator().manual_seed(0)
    return [
        {"input_features": torch.randn(8, 16, generator=g), "labels": torch.randint(3, VOCAB * 4, (5,), generator=g)}
        for _ in range(n)
    ]


def wav2vec2(model: str = "Wav2Vec2ForCTC") -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config_cls = getattr(transformers, model.replace("ForCTC", "Config").replace("Model", "Config"))
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.0, ctc_loss_reduction="mean", pad_token_id=0,
    )  # fmt: skip
    return getattr(transformers, model)(config)


def wav2vec2_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_values": torch.randn(800, generator=g), "labels": torch.randint(1, VOCAB, (4,), generator=g)}
        for _ in range(n)
    ]


class MelPreprocessor(nn.Module):
    """NeMo's ``AudioToMelSpectrogramPreprocessor`` in miniature: a window and a mel filterbank buffer applied to the
    raw signal with an STFT."""

    def __init__(self, n_fft: int = 32, n_mels: int = 8) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer(
            "filterbank", torch.rand(n_mels, n_fft // 2 + 1, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, input_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hop = self.n_fft // 2
        spec = torch.stft(input_signal, self.n_fft, hop_length=hop, window=self.window, return_complex=True)
        mel = self.filterbank @ spec.abs().pow(2)
        return torch.log(mel + 1e-6), length // hop + 1


class NemoStyleASR(pl.LightningModule):
    """A CTC model laid out as NeMo's ``EncDecCTCModel``: ``preprocessor``, ``encoder``, ``decoder``; it records the
    dtype of the signal its ``training_step`` receives."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.preprocessor = MelPreprocessor()
        self.encoder = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU())
        self.decoder = nn.Linear(16, VOCAB)
        self.signal_dtypes: list[torch.dtype] = []

    def forward(self, input_signal: torch.Tensor, input_signal_length: torch.Tensor) -> tuple[torch.Tensor, Any]:
        features, length = self.preprocessor(input_signal, input_signal_length)
        encoded = self.encoder(features).transpose(1, 2)
        return self.decoder(encoded).float().log_softmax(-1), length

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        signal, signal_length, targets, target_length = batch
        self.signal_dtypes.append(signal.dtype)
        log_probs, length = self(input_signal=signal, input_signal_length=signal_length)
        loss = nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, length, target_length)
        self.log("train_loss", loss, batch_size=len(signal))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def nemo_batches(n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(320, generator=g), torch.tensor(320), torch.randint(1, VOCAB, (4,), generator=g), torch.tensor(4))
        for _ in range(n)
    ]


class HFSpeech(pl.LightningModule):
    """A Hugging Face speech model held as ``self.model``, trained on dict batches passed as keywords; it records the
    batches its ``training_step`` receives."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches.append(batch)
        loss = self.model(**batch).loss
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)
