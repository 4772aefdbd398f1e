"""Bytes-per-parameter arithmetic: estimates from the pairing rule's OptimizerInfo, and measurement of live tensors."""

import pytest
import torch

from lightning_precision.catalogue import FLASH_QUANTIZED_MOMENT_BYTES, classify_optimizer
from lightning_precision.memory import (
    GIB,
    estimate_bytes_per_param,
    gib_per_device,
    measure_bytes_per_param,
    step_temporaries,
)

BF16, FP32 = torch.bfloat16, torch.float32


class _DeclaredCompensatedAdamW(torch.optim.Optimizer):
    """Stands for CompensatedAdamW: declares a compensated update and an fp32 second moment by default."""

    compensated_update = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), exp_avg_sq_dtype=torch.float32):
        super().__init__(params, {"lr": lr, "betas": betas})


def _estimate(storage, optimizer_cfg):
    return estimate_bytes_per_param(storage, classify_optimizer(optimizer_cfg))


@pytest.mark.parametrize("storage", [BF16, FP32])
def test_torch_adamw_keeps_two_moments_in_the_storage_dtype(storage):
    est = _estimate(storage, {"_target_": "torch.optim.AdamW"})
    size = storage.itemsize
    assert (est.params, est.grads, est.optimizer_state) == (size, size, 2 * size)
    assert est.total == 4 * size  # 8 B/param for bf16, 16 for fp32
    assert not est.measured


def test_flash_adamw_24_bit_quantized_moments_plus_one_ecc_byte():
    est = _estimate(BF16, {"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 24})
    assert est.optimizer_state == pytest.approx(2 * FLASH_QUANTIZED_MOMENT_BYTES + 1)
    assert dict(est.state_parts)["error-correction bits"] == 1
    assert FLASH_QUANTIZED_MOMENT_BYTES == pytest.approx(1 + 2 / 32)  # int8 value + one fp16 scale per 32


def test_flash_adamw_unquantized_moments_are_stored_in_the_parameter_dtype():
    # flashoptim stores unquantized moments with storage_dtype=param.dtype: 2 B each for bf16, plus 1 ECC byte.
    cfg = {"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 24, "quantize": False}
    est = estimate_bytes_per_param(BF16, classify_optimizer(cfg))
    assert dict(est.state_parts) == {"exp_avg bfloat16": 2, "exp_avg_sq bfloat16": 2, "error-correction bits": 1}


def test_kahan_optimizer_adds_a_compensation_buffer_in_the_parameter_dtype():
    est = _estimate(BF16, {"_target_": "optimi.AdamW", "lr": 1e-3})
    assert dict(est.state_parts) == {"exp_avg bfloat16": 2, "exp_avg_sq bfloat16": 2, "compensation bfloat16": 2}
    # fp32 parameters need no compensation: optimi only compensates half-precision parameters.
    assert _estimate(FP32, {"_target_": "optimi.AdamW", "lr": 1e-3}).optimizer_state == 8


def test_compensated_optimizer_with_fp32_second_moment():
    info = classify_optimizer(_DeclaredCompensatedAdamW)
    est = estimate_bytes_per_param(BF16, info)
    assert dict(est.state_parts) == {"exp_avg bfloat16": 2, "exp_avg_sq float32": 4, "compensation bfloat16": 2}
    assert est.total == 12


@pytest.mark.parametrize(("momentum", "state"), [(0.0, 0), (0.9, 4)])
def test_sgd_keeps_a_momentum_buffer_only_with_momentum(momentum, state):
    assert _estimate(FP32, {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": momentum}).optimizer_state == state


def test_unknown_storage_gives_no_estimate():
    assert estimate_bytes_per_param(None, classify_optimizer("torch.optim.AdamW")) is None


@pytest.mark.parametrize("storage", [BF16, FP32])
def test_measured_bytes_match_the_estimate_for_torch_adamw(storage):
    layer = torch.nn.Linear(64, 64).to(storage)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(8, 64, dtype=storage)).sum().backward()
    opt.step()
    measured = measure_bytes_per_param(opt)
    estimate = _estimate(storage, {"_target_": "torch.optim.AdamW"})
    assert measured.measured
    assert (measured.params, measured.grads) == (estimate.params, estimate.grads)
    # The measurement also counts the per-tensor `step` scalars, which the estimate leaves out.
    assert measured.optimizer_state == pytest.approx(estimate.optimizer_state, abs=0.01)
    assert measured.optimizer_state > estimate.optimizer_state


def test_measured_counts_released_gradients_in_the_parameter_dtype():
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    assert measure_bytes_per_param(opt).total == 8  # no grads yet, no state: params 4 + grads 4


@pytest.mark.parametrize(
    ("storage", "optimizer", "steady", "peak"),
    [
        (FP32, {"_target_": "torch.optim.AdamW"}, 16, 20),  # foreach: one fp32 copy of the parameters
        (FP32, {"_target_": "torch.optim.AdamW", "fused": True}, 16, 16),
        (BF16, {"_target_": "torch.optim.AdamW"}, 8, 10),
        (BF16, {"_target_": "optimi.AdamW", "lr": 1e-3}, 10, 10),
        (BF16, {"_target_": "lightning_precision.optim.CompensatedAdamW"}, 10, 10.375),
        (BF16, {"_target_": "lightning_precision.optim.CompensatedAdamW", "exp_avg_sq_dtype": "fp32"}, 12, 12.375),
        (BF16, {"_target_": "lightning_precision.optim.CompensatedAdamW", "implementation": "reference"}, 10, 30),
        (
            BF16,
            {
                "_target_": "lightning_precision.optim.CompensatedAdamW",
                "implementation": "reference",
                "exp_avg_sq_dtype": "fp32",
            },
            12,
            28,
        ),
    ],
)
def test_peak_adds_what_the_step_allocates(storage, optimizer, steady, peak):
    est = _estimate(storage, optimizer)
    assert (est.total, est.peak) == (pytest.approx(steady), pytest.approx(peak))
    assert "peak during the step" in est.describe()


def test_peak_is_unknown_for_an_optimizer_the_catalogue_cannot_size():
    assert _estimate(BF16, {"_target_": "my_lab.Optim"}).peak is None


@pytest.mark.parametrize(("foreach", "extra"), [(None, 0.0), (True, 4.0)])
def test_measured_steady_state_carries_the_steps_temporaries_for_cpu_parameters(foreach, extra):
    param = torch.nn.Parameter(torch.randn(64, 8))
    optimizer = torch.optim.AdamW([param], foreach=foreach)
    param.grad = torch.randn_like(param)
    optimizer.step()
    measured = measure_bytes_per_param(optimizer)
    assert measured.peak == pytest.approx(measured.total + extra)


# One definition of peak: steady state + the step's temporaries for the device the parameters live on. explain (an
# estimate) and compare (a measurement) both take the step's part from memory.step_temporaries.


@pytest.mark.parametrize(("on_cpu", "copy"), [(False, 4), (True, 0)])
def test_the_peak_of_torch_adamw_depends_on_where_the_parameters_live(on_cpu, copy):
    est = estimate_bytes_per_param(FP32, classify_optimizer({"_target_": "torch.optim.AdamW"}), on_cpu=on_cpu)
    assert est.total == 4 + 4 + 8  # fp32 weights, grads, exp_avg + exp_avg_sq
    assert est.peak == est.total + copy  # foreach on an accelerator copies the fp32 parameters; CPU's loop does not


def test_measured_cpu_peak_agrees_with_the_cpu_estimate():
    layer = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(8, 64)).sum().backward()
    opt.step()
    measured = measure_bytes_per_param(opt)
    estimate = estimate_bytes_per_param(FP32, classify_optimizer(opt), on_cpu=True)
    assert (
        measured.peak - measured.total
        == estimate.peak - estimate.total
        == step_temporaries(classify_optimizer(opt), FP32, on_cpu=True)
    )


def test_step_temporaries_of_no_optimizer_are_zero():
    assert step_temporaries(None, BF16, on_cpu=False) == 0.0


def test_gib_per_device_shards_everything_over_the_devices():
    est = _estimate(FP32, {"_target_": "torch.optim.AdamW"})
    sharded = gib_per_device(est, 7 * 10**9, devices=8, sharded=True)
    assert sharded.steady == pytest.approx(7e9 * (4 + 4 + 8) / 8 / GIB)
    assert sharded.weights == pytest.approx(7e9 * 4 / 8 / GIB)
    assert sharded.peak == pytest.approx(7e9 * est.peak / 8 / GIB)


def test_gib_per_device_replicates_without_sharding():
    est = _estimate(BF16, {"_target_": "torch.optim.AdamW"})
    assert gib_per_device(est, 10**9, devices=8).steady == pytest.approx(1e9 * (2 + 2 + 4) / GIB)


def test_gib_per_device_peak_is_unknown_when_the_step_is():
    assert gib_per_device(_estimate(BF16, {"_target_": "my_lab.Optim"}), 10**9).peak is None


def test_gib_per_device_refuses_zero_devices():
    with pytest.raises(ValueError, match="devices=0"):
        gib_per_device(_estimate(BF16, {"_target_": "torch.optim.AdamW"}), 10**9, devices=0)
