"""lightning_precision.fabric.check: the pairing judged right after fabric.setup, the contract logged on rank zero."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError, PrecisionPairingError, PrecisionWarning, Status
from lightning_precision.fabric import CheckedMixedPrecision, HalfPrecisionForAudio, check
from lightning_precision.optim import CompensatedAdamW
from tests.fabric.helpers import Net, fabric_with, train
from tests.helpers import loader, lora_llama


def test_litgpt_style_bf16_true_with_torch_adamw_is_refused_right_after_setup():
    # LitGPT's configs say `precision: bf16-true` with torch AdamW: Lightning's own HalfPrecision plugin.
    fabric = fabric_with(precision="bf16-true")
    net = Net()
    _, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(PrecisionPairingError, match="bfloat16.*raised because on_unsafe='error'"):
        check(fabric, optimizer, on_unsafe="error")
    assert len(optimizer.state) == 0


def test_check_warns_once_and_the_plugin_does_not_judge_again(caplog):
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true"))
    verdicts = []
    with caplog.at_level(logging.INFO, logger="lightning_precision"), pytest.warns(PrecisionWarning) as record:
        train(fabric, Net(), before_loop=lambda f, opt: verdicts.extend(check(f, opt)))
    assert [v.status for v in verdicts] == [Status.UNSAFE]
    assert sum(issubclass(w.category, PrecisionWarning) for w in record) == 1
    assert "lightning_precision.fabric.check" in str(record[0].message)
    assert caplog.text.count("Precision contract (precision=bf16-true)") == 1  # not again at the first step
    assert "UNSAFE pairing, see warning" in caplog.text


def test_safe_pairing_logs_the_contract_with_the_state_dtype(caplog):
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true"))
    net = Net()
    optimizer = CompensatedAdamW(net.parameters())
    _, optimizer = fabric.setup(net, optimizer)
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        (verdict,) = check(fabric, optimizer)
    assert verdict.status is Status.SAFE
    assert "CompensatedAdamW" in caplog.text and "bfloat16" in caplog.text


def test_check_follows_the_plugin_policy_and_refuses_a_disagreeing_one():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", on_unsafe="error"))
    _, optimizer = fabric.setup(net := Net(), torch.optim.AdamW(net.parameters()))
    with pytest.raises(PrecisionPairingError):
        check(fabric, optimizer)
    with pytest.raises(PrecisionConfigError, match="disagree"):
        check(fabric, optimizer, on_unsafe="warn")
    with pytest.raises(PrecisionConfigError, match="on_unsafe='loud'"):
        check(fabric, optimizer, on_unsafe="loud")


def _lora_fit_step(**plugin_kwargs):
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", **plugin_kwargs))
    model = fabric.setup(lora_llama())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    verdicts = check(fabric, optimizer)
    ids = torch.randint(0, 64, (2, 8))
    fabric.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    return verdicts, {p.dtype for p in model.parameters() if p.requires_grad}


def test_peft_lora_adapters_cast_to_bf16_under_adamw_are_unsafe():
    with pytest.warns(PrecisionWarning, match="trainable bfloat16 parameter tensors"):
        verdicts, adapter_dtypes = _lora_fit_step(keep_trainable_fp32=False)
    assert adapter_dtypes == {torch.bfloat16} and [v.status for v in verdicts] == [Status.UNSAFE]


def test_peft_lora_adapters_kept_fp32_as_the_fix_says_are_safe_and_train():
    verdicts, adapter_dtypes = _lora_fit_step(keep_trainable_fp32=False, fp32_modules=["*.lora_A.*", "*.lora_B.*"])
    assert adapter_dtypes == {torch.float32} and [v.status for v in verdicts] == [Status.SAFE]


def test_mixed_precision_catches_a_model_loaded_in_bf16():
    fabric = fabric_with(CheckedMixedPrecision("bf16-mixed", on_unsafe="error"))
    net = Net().to(torch.bfloat16)
    with pytest.raises(PrecisionPairingError, match="load the model in fp32"):
        train(fabric, net)


def test_unsafe_message_at_the_first_step_names_fabric_arguments():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", on_unsafe="error"))
    with pytest.raises(PrecisionPairingError, match=r"Fabric\(precision='bf16-mixed'\)") as raised:
        train(fabric, Net())
    assert "FSDP2Strategy" not in str(raised.value) and "model.torch_dtype" not in str(raised.value)


def test_mixed_precision_on_fp32_autocasts_and_keeps_fp32_state():
    fabric = fabric_with(CheckedMixedPrecision("bf16-mixed", on_unsafe="error"))
    net = Net()
    _, optimizer = train(fabric, net)
    assert net.seen[0]["autocast"] is True
    assert (net.seen[0]["x"], net.seen[0]["audio"]) == (torch.float32, torch.float32)  # inputs left to autocast
    assert optimizer.state[net.net[0].weight]["exp_avg"].dtype == torch.float32


def test_mixed_precision_rejects_other_strings():
    with pytest.raises(PrecisionConfigError, match=r"CheckedMixedPrecision\(precision='bf16-true'\).*'bf16-mixed'"):
        CheckedMixedPrecision("bf16-true")


def test_fp32_modules_under_fabric_keep_the_front_end_fp32(caplog):
    class Speech(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frontend = nn.Linear(8, 8)
            self.encoder = nn.Linear(8, 1)
            self.seen: dict[str, torch.dtype] = {}
            self.frontend.register_forward_hook(self._record)

        def _record(self, module, inputs, output):
            self.seen = {"input": inputs[0].dtype, "weight": module.weight.dtype, "output": output.dtype}

        def forward(self, batch):
            return self.encoder(self.frontend(batch["audio_signal"])).float().mean()

    fabric = fabric_with(HalfPrecisionForAudio("bf16-true", fp32_modules=["frontend"]))
    net = Speech()
    model, optimizer = fabric.setup(net, CompensatedAdamW(net.parameters()))
    with caplog.at_level(logging.INFO, logger="lightning_precision"):
        check(fabric, optimizer)
    fabric.backward(model({"audio_signal": torch.randn(2, 8)}))
    optimizer.step()
    assert (net.frontend.weight.dtype, net.encoder.weight.dtype) == (torch.float32, torch.bfloat16)
    assert net.seen == {"input": torch.float32, "weight": torch.float32, "output": torch.float32}
    assert "kept in fp32: frontend" in caplog.text
    with pytest.raises(PrecisionConfigError, match="match no submodule"):
        fabric_with(HalfPrecisionForAudio("bf16-true", fp32_modules=["nothing"])).setup(Speech())


def test_policy_given_to_check_also_applies_at_the_plugins_first_step():
    fabric = fabric_with(HalfPrecisionForAudio("bf16-true"))  # plugin left at the default policy
    model, safe = fabric.setup(net := Net(), CompensatedAdamW(net.parameters()))
    check(fabric, safe, on_unsafe="error")
    unsafe = fabric.setup_optimizers(torch.optim.AdamW(net.parameters()))  # never passed to check
    fabric.backward(model(next(iter(loader()))))
    with pytest.raises(PrecisionPairingError, match="first optimizer step"):
        unsafe.step()
