"""HalfPrecisionForAudio under Lightning Fabric: dtypes of parameters, optimizer state and inputs, and the pairing
check before the first step."""

from __future__ import annotations

import copy
import logging
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError, PrecisionPairingError, PrecisionWarning
from lightning_precision.fabric import HalfPrecisionForAudio
from lightning_precision.optim import CompensatedAdamW
from tests.fabric.helpers import Net, fabric_with, state_dtypes, train
from tests.helpers import adapter_params, loader, lora_llama


def test_bf16_true_with_compensated_adamw_trains_in_bf16_and_keeps_audio():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true"))
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # a safe pairing says nothing
        _, optimizer = train(fabric, net, lambda p: CompensatedAdamW(p, lr=1e-2))
    seen = net.seen[0]
    assert (seen["x"], seen["audio"], seen["idx"]) == (torch.bfloat16, torch.float32, torch.int64)
    assert seen["param"] == torch.bfloat16 and seen["default"] == torch.bfloat16  # Fabric's HalfPrecision context
    assert state_dtypes(optimizer, net.net[0].weight) == (torch.bfloat16, torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # restored after the forward


def test_torch_adamw_warns_once_at_the_first_step():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true"))
    net = Net()
    with pytest.warns(PrecisionWarning) as record:
        _, optimizer = train(fabric, net, steps=3)
    messages = [str(w.message) for w in record if issubclass(w.category, PrecisionWarning)]
    assert len(messages) == 1 and "torch.optim.adamw.AdamW" in messages[0] and "first optimizer step" in messages[0]
    assert state_dtypes(optimizer, net.net[0].weight) == (torch.bfloat16, torch.bfloat16)  # what it warned about


def test_error_refuses_before_the_first_update():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", on_unsafe="error"))
    net = Net()
    snapshots: list[list[torch.Tensor]] = []
    optimizers = []

    def snapshot(fabric, optimizer):
        snapshots.append([p.detach().clone() for p in net.parameters()])
        optimizers.append(optimizer)

    with pytest.raises(PrecisionPairingError, match="bfloat16"):
        train(fabric, net, before_loop=snapshot)
    assert len(net.seen) == 1  # one forward/backward ran, then the step was refused
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], net.parameters()))
    assert len(optimizers[0].state) == 0  # AdamW never created its state


class TupleNet(nn.Module):
    """NeMo's ASR batch shape: (audio_signal, audio_lengths, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen: list[tuple[torch.dtype, ...]] = []

    def forward(self, *batch):
        if len(batch) == 1:
            batch = batch[0]
        audio, lengths, feats = batch
        self.seen.append((audio.dtype, lengths.dtype, feats.dtype))
        return self.lin(feats + audio.to(feats.dtype)).float().mean()


Batch = namedtuple("Batch", ["audio_signal", "audio_lengths", "feats"])


@pytest.mark.parametrize("call", ["whole_batch", "unpacked", "namedtuple"])
def test_tuple_positions_are_preserved(call):
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", preserve_keys=[0]))
    net = TupleNet()
    model = fabric.setup(net)
    batch = (torch.randn(2, 4), torch.tensor([4, 3]), torch.randn(2, 4))
    if call == "whole_batch":
        model(batch)
    elif call == "unpacked":
        model(*batch)
    else:
        model(Batch(*batch))
    assert net.seen == [(torch.float32, torch.int64, torch.bfloat16)]


def test_keyword_arguments_are_matched_by_name():
    class KwNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.seen: dict[str, torch.dtype] = {}

        def forward(self, x, audio=None):
            self.seen = {"x": x.dtype, "audio": audio.dtype}
            return self.lin(x)

    net = KwNet()
    fabric_with(HalfPrecisionForAudio("fp16-true")).setup(net)(torch.randn(2, 4), audio=torch.randn(2, 4))
    assert net.seen == {"x": torch.float16, "audio": torch.float32}


def test_bad_precision_names_the_value_and_choices():
    with pytest.raises(PrecisionConfigError, match=r"HalfPrecisionForAudio\(precision='bf16-mixed'\).*'bf16-true'"):
        HalfPrecisionForAudio("bf16-mixed")
    with pytest.raises(PrecisionConfigError, match="on_unsafe='loud'"):
        HalfPrecisionForAudio(on_unsafe="loud")


def _micro_batch_grads(net: Net, batches: list, micro: int) -> dict[str, torch.Tensor]:
    """Each micro-batch's bf16 gradient (of loss / micro) alone, summed in fp32."""
    twin = copy.deepcopy(net).to(torch.bfloat16)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in twin.named_parameters()}
    for batch in batches:
        twin.zero_grad(set_to_none=True)
        cast = HalfPrecisionForAudio("bf16-true").convert_input(batch)
        (twin(cast) / micro).backward()
        for n, p in twin.named_parameters():
            total[n] += p.grad.float()
    return total


def test_accumulate_grad_dtype_sums_a_fabric_loops_micro_batches_in_fp32():
    net = Net()
    reference = _micro_batch_grads(net, list(loader())[:4], 4)
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    fabric = fabric_with(plugin)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.0))
    for batch in list(fabric.setup_dataloaders(loader()))[:4]:
        fabric.backward(model(batch) / 4)
        assert all(p.grad is None for p in model.parameters())  # parked in the fp32 buffers
    fabric.clip_gradients(model, optimizer, max_norm=1e9)  # hands the sum over before reading it
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n.removeprefix("_forward_module.")].bfloat16(), rtol=0, atol=0)
    optimizer.step()
    assert not plugin.grad_accumulator.pending


def test_fabric_step_hands_over_without_clipping():
    net = Net()
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    fabric = fabric_with(plugin)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    for batch in list(fabric.setup_dataloaders(loader()))[:2]:
        fabric.backward(model(batch))
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the step saw the gradients


def test_fabric_contract_names_the_fp32_buffers(caplog):
    plugin = HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32", on_unsafe="ignore")
    fabric = fabric_with(plugin)
    net = Net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.0))
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        fabric.backward(model(next(iter(fabric.setup_dataloaders(loader())))))
        optimizer.step()
    assert "gradient accumulation: decided by the training loop (a sum of param.grad is kept in float32)" in caplog.text


def _accumulating_setup() -> HalfPrecisionForAudio:
    return HalfPrecisionForAudio("bf16-true", accumulate_grad_dtype="float32")


def _compensated(params):
    return CompensatedAdamW(params, lr=1e-2)


def test_setting_a_module_up_again_trains_bitwise_like_a_first_setup():
    """Fabric has no teardown: a new Fabric (and plugin) around the same module replaces the first one's hooks."""
    torch.manual_seed(0)
    net = Net()
    train(fabric_with(_accumulating_setup()), net, _compensated)
    fresh = Net()
    fresh.load_state_dict(net.state_dict())  # bf16 values into fp32 parameters: exact, and cast back exactly
    train(fabric_with(_accumulating_setup()), net, _compensated)
    train(fabric_with(_accumulating_setup()), fresh, _compensated)
    for (name, again), first in zip(net.named_parameters(), fresh.parameters()):
        assert torch.equal(again, first), name


def test_setting_a_module_up_again_leaves_one_gradient_hook_per_parameter():
    net = Net()
    for _ in range(3):
        fabric_with(_accumulating_setup()).setup(net)
    assert [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()] == [1] * 4


# -- adapter training: trainable parameters kept fp32, frozen base in half (a real PEFT LoRA Llama) ---------------


def _lora_steps(fabric, model, steps: int = 3) -> tuple[list, list[float], dict[str, torch.Tensor]]:
    from lightning_precision.fabric import check

    wrapped = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(adapter_params(model).values(), lr=1e-2))
    verdicts = check(fabric, optimizer)
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    ids, losses = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), []
    for _ in range(steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return verdicts, losses, before


def test_peft_lora_keeps_adapters_fp32_and_base_bf16_by_default_and_trains(caplog):
    from lightning_precision import Status

    plugin, lora = HalfPrecisionForAudio("bf16-true"), lora_llama()
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        verdicts, losses, before = _lora_steps(fabric_with(plugin), lora)
    assert {p.dtype for p in adapter_params(lora).values()} == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert [v.status for v in verdicts] == [Status.SAFE]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in adapter_params(lora).items())
    assert "HalfPrecisionForAudio: PEFT model" in caplog.text and "in 4 modules" in caplog.text
    assert "parameters: trainable float32, frozen bfloat16" in caplog.text
    assert plugin.parameter_dtypes == ("float32", "bfloat16") and len(plugin.fp32_module_names) == 4


def test_peft_lora_set_up_again_keeps_one_boundary_per_adapter_and_its_values():
    lora = lora_llama()
    fabric_with(HalfPrecisionForAudio("bf16-true")).setup(lora)
    values = {n: p.detach().clone() for n, p in adapter_params(lora).items()}
    fabric_with(HalfPrecisionForAudio("bf16-true")).setup(lora)
    adapters = [m for n, m in lora.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert [len(m._forward_pre_hooks) for m in adapters] == [1] * 4
    assert all(torch.equal(values[n], p) for n, p in adapter_params(lora).items())
    assert {p.dtype for p in adapter_params(lora).values()} == {torch.float32}
