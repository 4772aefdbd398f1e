"""HalfPrecisionForAudio."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_precision import HalfPrecisionForAudio, PrecisionConfigError, PrecisionGuard, PrecisionWarning
from tests.helpers import QUIET_TRAINER, RecordingModule, adapter_params, fit, loader, lora_llama

HALF = {"bf16-true": torch.bfloat16, "fp16-true": torch.float16, "16-true": torch.float16}


@pytest.mark.parametrize(("precision", "dtype"), HALF.items())
def test_is_lightning_half_precision(precision, dtype):
    plugin = HalfPrecisionForAudio(precision)
    assert isinstance(plugin, HalfPrecision)
    assert plugin.convert_module(torch.nn.Linear(2, 2)).weight.dtype == dtype
    with plugin.forward_context():
        assert torch.get_default_dtype() == dtype
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(("precision", "dtype"), HALF.items())
def test_convert_input_preserves_audio(precision, dtype):
    audio = torch.randn(3)
    out = HalfPrecisionForAudio(precision).convert_input({"audio": audio, "x": torch.randn(3)})
    assert out["audio"] is audio and out["x"].dtype == dtype


def test_preserve_keys_configurable():
    mel = torch.randn(3)
    out = HalfPrecisionForAudio("bf16-true", preserve_keys=["mel"]).convert_input({"mel": mel, "audio": mel})
    assert out["mel"] is mel and out["audio"].dtype == torch.bfloat16


def test_audio_preset_keeps_its_keys_besides_the_given_ones():
    plugin = HalfPrecisionForAudio("bf16-true", preserve_keys=["mel"], audio_preset="whisper")
    features, mel = torch.randn(3), torch.randn(3)
    out = plugin.convert_input({"input_features": features, "mel": mel, "x": torch.randn(3)})
    assert out["input_features"] is features and out["mel"] is mel and out["x"].dtype == torch.bfloat16


def test_audio_preset_refuses_a_first_batch_without_its_keys_naming_them():
    plugin = HalfPrecisionForAudio("bf16-true", audio_preset="wav2vec2")
    with pytest.raises(PrecisionConfigError, match=r"\['input_values'\].*dict with keys \['audio', 'labels'\]"):
        plugin.convert_input({"audio": torch.randn(3), "labels": torch.tensor([1])})


def test_audio_preset_checks_only_until_its_keys_are_found():
    plugin = HalfPrecisionForAudio("bf16-true", audio_preset="wav2vec2")
    plugin.convert_input({"input_values": torch.randn(3)})
    assert plugin.convert_input({"encoder_outputs": torch.randn(3)})["encoder_outputs"].dtype == torch.bfloat16


def test_unknown_audio_preset_is_refused_with_the_call():
    with pytest.raises(PrecisionConfigError, match=r"HalfPrecisionForAudio\(audio_preset=...\): 'hubert'"):
        HalfPrecisionForAudio("bf16-true", audio_preset="hubert")


@pytest.mark.parametrize("bad", ["bf16-mixed", "bf16-flash", "fp32", "bf16"])
def test_rejects_other_precisions_with_the_call(bad):
    with pytest.raises(ValueError, match=rf"HalfPrecisionForAudio\(precision='{bad}'\).*'bf16-true'"):
        HalfPrecisionForAudio(bad)
    assert issubclass(PrecisionConfigError, ValueError)


def test_rejects_bad_on_unsafe():
    with pytest.raises(PrecisionConfigError, match="'sometimes'"):
        HalfPrecisionForAudio("bf16-true", on_unsafe="sometimes")


@pytest.mark.parametrize("spelling, expected", [("False", False), ("true", True), (0, False)])
def test_peft_spellings_are_read_as_booleans(spelling, expected):
    assert HalfPrecisionForAudio("bf16-true", peft=spelling).peft is expected


def test_peft_that_is_not_a_boolean_is_refused():
    with pytest.raises(
        PrecisionConfigError, match=r"HalfPrecisionForAudio\(peft=...\): 'maybe'.*expected True or False"
    ):
        HalfPrecisionForAudio("bf16-true", peft="maybe")


class _GradsBeforeStep(RecordingModule):
    """Records the gradients clipping and the optimizer would see at each step."""

    def __init__(self) -> None:
        super().__init__(optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.0))
        self.step_grads: list[dict[str, torch.Tensor]] = []
        self.grads_after_backward: list[bool] = []  # whether autograd's gradients were left in param.grad

    def on_after_backward(self) -> None:
        self.grads_after_backward.append(all(p.grad is not None for p in self.parameters()))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.step_grads.append({n: p.grad.clone() for n, p in self.named_parameters()})


def _fp32_sum_of_micro_batches(module, dtype, batches, n):
    """Each micro-batch's half gradient (of loss / n, as Lightning scales it) alone, summed in fp32."""
    twin = copy.deepcopy(module).to(dtype)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in twin.named_parameters()}
    for batch in batches:
        twin.zero_grad(set_to_none=True)
        cast = HalfPrecisionForAudio("bf16-true" if dtype == torch.bfloat16 else "fp16-true").convert_input(batch)
        with torch.autocast("cpu", enabled=False):
            (twin.training_step(cast, 0) / n).backward()
        for name, p in twin.named_parameters():
            total[name] += p.grad.float()
    return total


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("fp16-true", torch.float16)])
def test_accumulate_grad_dtype_hands_the_fp32_sum_to_the_step(precision, dtype):
    module = _GradsBeforeStep()
    initial = copy.deepcopy(module)
    plugin = HalfPrecisionForAudio(precision, accumulate_grad_dtype="float32", on_unsafe="ignore")
    fit(module, steps=1, plugins=[plugin], accumulate_grad_batches=4)
    reference = _fp32_sum_of_micro_batches(initial, dtype, list(loader())[:4], 4)
    (seen,) = module.step_grads
    for name, grad in seen.items():
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, reference[name].to(dtype), rtol=0, atol=0)
    assert not plugin.grad_accumulator.pending


def test_accumulate_grad_dtype_leaves_single_micro_batch_steps_to_autograd():
    module = _GradsBeforeStep()
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    fit(module, steps=2, plugins=[plugin], accumulate_grad_batches=1)
    assert len(module.step_grads) == 2 and module.grads_after_backward == [True, True]


def test_accumulate_grad_dtype_is_refused_unless_float32():
    with pytest.raises(PrecisionConfigError, match=r"HalfPrecisionForAudio\(accumulate_grad_dtype=...\)` got 'bf16'"):
        HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="bf16")


class _PluginStates(_GradsBeforeStep):
    """Records the plugin's state_dict after every micro-batch, as a checkpoint written there would hold it."""

    def __init__(self, plugin) -> None:
        super().__init__()
        self.plugin = plugin
        self.states: list[dict] = []

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.states.append(self.plugin.state_dict())


def test_state_dict_holds_the_buffers_only_mid_accumulation():
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    module = _PluginStates(plugin)
    fit(module, steps=1, plugins=[plugin], accumulate_grad_batches=2)
    mid, after_step = module.states
    assert after_step == {}
    saved = mid["grad_accumulation"]
    assert set(saved["buffers"]) == {name for name, _ in module.named_parameters()}
    with pytest.raises(PrecisionConfigError, match="accumulate_grad_dtype='float32'"):
        HalfPrecisionForAudio("bf16-true").load_state_dict({"grad_accumulation": saved})


# -- adapter training: trainable parameters kept fp32, frozen base in half (a real PEFT LoRA Llama) ---------------


class _LoraModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = lora_llama()

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_params(self).values(), lr=1e-2)


def _fit_lora(module: _LoraModule, plugin: HalfPrecisionForAudio) -> pl.Trainer:
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(**QUIET_TRAINER, max_steps=3, plugins=[plugin], callbacks=[PrecisionGuard()])
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    return trainer


def test_peft_lora_trains_fp32_adapters_on_a_bf16_base_by_default_and_is_safe():
    module = _LoraModule()
    trainer = _fit_lora(module, HalfPrecisionForAudio("bf16-true"))
    before = {n: p.detach().clone() for n, p in adapter_params(module).items()}
    trainer = _fit_lora(module, HalfPrecisionForAudio("bf16-true"))  # a second fit: nothing applied twice
    contract = trainer.callbacks[0].contract
    assert {p.dtype for p in adapter_params(module).values()} == {torch.float32}
    assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert [o.verdict for o in contract.optimizers] == ["safe"] and contract.optimizers[0].storage_dtype == "float32"
    assert (contract.trainable_dtypes, contract.frozen_dtypes) == ("float32", "bfloat16")
    assert len(contract.fp32_modules) == 4 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert all(not torch.equal(before[n], p) for n, p in adapter_params(module).items())
    adapters = [m for n, m in module.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert [len(m._forward_hooks) for m in adapters] == [1] * 4


def test_peft_lora_with_keep_trainable_fp32_off_casts_the_adapters_and_is_unsafe():
    module = _LoraModule()
    with pytest.warns(PrecisionWarning, match="trainable bfloat16 parameter tensors"):
        trainer = _fit_lora(module, HalfPrecisionForAudio("bf16-true", keep_trainable_fp32=False))
    assert {p.dtype for p in adapter_params(module).values()} == {torch.bfloat16}
    assert [o.verdict for o in trainer.callbacks[0].contract.optimizers] == ["unsafe"]


def test_keep_trainable_fp32_that_is_not_a_boolean_is_refused():
    with pytest.raises(PrecisionConfigError, match=r"keep_trainable_fp32=\.\.\.\): 'yes'"):
        HalfPrecisionForAudio("bf16-true", keep_trainable_fp32="yes")
