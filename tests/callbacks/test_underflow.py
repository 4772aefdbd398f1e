"""UpdateUnderflowMonitor: measures updates that round away in half-precision storage."""

import csv
import warnings

import optimi
import pytest
import torch
from torch import nn

from lightning_precision import PrecisionWarning
from lightning_precision.callbacks import UpdateUnderflowMonitor
from lightning_precision.callbacks.underflow import METRIC_EXP_AVG_SQ, METRIC_UPDATE, sample_indices
from lightning_precision.optim import CompensatedAdamW
from lightning_precision.underflow import UnderflowMeter
from tests.helpers import RecordingModule, fit

# lr 1e-5 is far below half a bf16 ulp of weights of size ~0.1 (~2.4e-4) and far above one fp32 ulp (~1.2e-8):
# the gap is three orders of magnitude on both sides, so the outcome does not hinge on the data or the seed.
SMALL_LR = 1e-5


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=SMALL_LR)


def optimi_adamw(params):
    return optimi.AdamW(params, lr=SMALL_LR)  # Kahan summation is automatic for bf16 parameters


def compensated_adamw(params):
    return CompensatedAdamW(params, lr=SMALL_LR)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than contending for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def monitored_fit(factory, precision, steps=4, **monitor_kwargs):
    monitor = UpdateUnderflowMonitor(**{"every_n_steps": 1, **monitor_kwargs})
    torch.manual_seed(0)
    module = RecordingModule(factory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, steps=steps, precision=precision, callbacks=[monitor])
    stale_warnings = [w for w in caught if issubclass(w.category, PrecisionWarning) and "Underflow" in str(w.message)]
    return monitor, stale_warnings


def test_fp32_storage_has_no_stale_updates():
    monitor, _ = monitored_fit(torch_adamw, "32-true")
    assert monitor.latest.stale_update_fraction < 0.01


def test_bf16_storage_with_torch_adamw_loses_most_updates():
    monitor, _ = monitored_fit(torch_adamw, "bf16-true")
    assert monitor.latest.stale_update_fraction > 0.9


@pytest.mark.parametrize("factory", [optimi_adamw, compensated_adamw], ids=["optimi.AdamW", "CompensatedAdamW"])
def test_compensated_optimizer_keeps_the_update(factory):
    monitor, _ = monitored_fit(factory, "bf16-true")
    # Not exactly 0: the compensation buffer is bf16 too and drops updates below its own resolution.
    assert monitor.latest.stale_update_fraction < 0.05
    assert monitor.latest.unmeasured == ()  # measured through the compensation buffer, not skipped


def test_warning_fires_once_after_consecutive_measurements():
    _, early = monitored_fit(torch_adamw, "bf16-true", steps=2, patience=3)
    _, late = monitored_fit(torch_adamw, "bf16-true", steps=6, patience=3)
    assert early == []
    (warning,) = [w for w in late if "parameter updates" in str(w.message)]
    assert "3 consecutive" in str(warning.message) and "precision='bf16-mixed'" in str(warning.message)


def test_no_warning_for_fp32():
    _, caught = monitored_fit(torch_adamw, "32-true", steps=6, patience=3)
    assert caught == []


def test_metrics_logged_to_csv(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    monitor = UpdateUnderflowMonitor(every_n_steps=2)
    fit(RecordingModule(torch_adamw), steps=4, precision="bf16-true", callbacks=[monitor], logger=CSVLogger(tmp_path))
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get(METRIC_UPDATE)]
    assert {METRIC_UPDATE, f"{METRIC_UPDATE}/group_0", METRIC_EXP_AVG_SQ} <= set(rows[0])
    assert [int(r["step"]) for r in logged] == [1, 3]  # measured at the 1st and 3rd optimizer step
    assert float(logged[-1][METRIC_UPDATE]) == pytest.approx(monitor.latest.stale_update_fraction)


def test_per_group_fractions_are_separate():
    def two_groups(params):
        first, *rest = list(params)
        return torch.optim.AdamW([{"params": [first], "name": "first"}, {"params": rest, "lr": 1e-2}], lr=SMALL_LR)

    monitor, _ = monitored_fit(two_groups, "bf16-true")
    groups = monitor.latest.groups
    assert set(groups) == {"first", "group_1"}
    assert groups["first"] > groups["group_1"]  # lr 1e-2 moves bf16 weights; lr 1e-5 does not


def test_sampling_bound_respected():
    monitor, _ = monitored_fit(torch_adamw, "bf16-true", steps=1, max_elements_per_tensor=10)
    sampled = {p.name: p.sampled for p in monitor.latest.params}
    numel = {n: p.numel() for n, p in RecordingModule().named_parameters()}
    assert sampled == {n: min(k, 10) for n, k in numel.items()}


def test_sample_indices_are_distinct_in_range_and_deterministic():
    idx = sample_indices(1_000_003, 4096, seed=7)
    assert idx.numel() == 4096 and idx.unique().numel() == 4096
    assert 0 <= idx.min() and idx.max() < 1_000_003
    assert torch.equal(idx, sample_indices(1_000_003, 4096, seed=7))


@pytest.mark.parametrize(("dtype", "stale"), [(torch.float32, False), (torch.bfloat16, True)])
def test_second_moment_cannot_decay_in_bf16(dtype, stale):
    # Without a Trainer: a bf16 exp_avg_sq with beta2=0.999 stops moving once (1 - beta2) * (g^2 - v) is below half
    # a bf16 ulp of v, which takes a few hundred steps; a plain loop gets there in a fraction of a second.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=SMALL_LR, betas=(0.9, 0.999))
    monitor = UpdateUnderflowMonitor(every_n_steps=100)
    monitor.attach([optimizer], net.named_parameters())
    x, y = torch.randn(64, 8, dtype=dtype), torch.randn(64, 1)
    for step in range(401):
        batch = torch.randint(0, 64, (8,))
        loss = nn.functional.mse_loss(net(x[batch]).float(), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.collect(step)
    monitor.detach()
    fraction = monitor.latest.stale_exp_avg_sq_fraction
    assert fraction > 0.3 if stale else fraction < 0.01


def test_dtensor_shards_are_measured(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
    fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
    assert isinstance(net[0].weight, DTensor)
    optimizer = torch.optim.AdamW(net.parameters(), lr=SMALL_LR)
    monitor = UpdateUnderflowMonitor(every_n_steps=1)
    monitor.attach([optimizer], net.named_parameters())
    net(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    optimizer.step()
    report = monitor.collect()  # all-reduces over the 1-rank group
    assert report.stale_update_fraction > 0.9
    assert {p.name for p in report.params} == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"every_n_steps": -5}, "every_n_steps=-5"),
        ({"threshold": -0.1}, r"threshold=-0.1.*\[0, 1\]"),
        ({"threshold": 1.5}, r"threshold=1.5.*\[0, 1\]"),
        ({"patience": 0}, "patience=0"),
        ({"max_elements_per_tensor": 0}, "max_elements_per_tensor=0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateUnderflowMonitor(**kwargs)


def test_fractions_reach_callback_metrics_without_a_logger(caplog):
    monitor = UpdateUnderflowMonitor(every_n_steps=1)
    with caplog.at_level("INFO", logger="lightning_precision"):
        trainer = fit(RecordingModule(torch_adamw), steps=2, precision="bf16-true", callbacks=[monitor], logger=False)
    assert float(trainer.callback_metrics[METRIC_UPDATE]) == pytest.approx(monitor.latest.stale_update_fraction)
    assert f"{METRIC_UPDATE}/group_0" in trainer.callback_metrics
    assert "no logger" in caplog.text


def test_early_stopping_can_monitor_the_stale_fraction():
    from lightning.pytorch.callbacks import EarlyStopping

    monitor = UpdateUnderflowMonitor(every_n_steps=1)
    stop = EarlyStopping(monitor=METRIC_UPDATE, mode="min", patience=0, check_on_train_epoch_end=True)
    fit(RecordingModule(torch_adamw), steps=8, precision="bf16-true", callbacks=[monitor, stop], max_epochs=3)
    assert torch.isfinite(stop.best_score)  # EarlyStopping read the fraction (it starts at inf, raises if missing)
    assert float(stop.best_score) <= monitor.latest.stale_update_fraction


def test_teardown_removes_the_optimizer_hooks():
    trainer = fit(RecordingModule(torch_adamw), steps=2, precision="bf16-true", callbacks=[UpdateUnderflowMonitor()])
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_detach_lets_the_optimizer_go_and_keeps_the_report():
    import gc
    import weakref

    model = nn.Linear(4, 4).bfloat16()
    optimizer = torch_adamw(model.parameters())
    meter = UnderflowMeter(every_n_steps=1)
    meter.attach([optimizer], model.named_parameters())
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    assert meter.collect() is not None
    meter.detach()
    gone = weakref.ref(optimizer)
    del model, optimizer
    gc.collect()
    assert gone() is None and meter.latest is not None


def test_a_refit_measures_like_a_first_fit_from_the_same_state():
    torch.manual_seed(0)
    module, monitor = RecordingModule(compensated_adamw), UpdateUnderflowMonitor(every_n_steps=1)
    fit(module, steps=2, precision="bf16-true", callbacks=[monitor])
    fresh = RecordingModule(compensated_adamw)
    fresh.load_state_dict(module.state_dict())
    fit(module, steps=3, precision="bf16-true", callbacks=[monitor])
    first = UpdateUnderflowMonitor(every_n_steps=1)
    fit(fresh, steps=3, precision="bf16-true", callbacks=[first])
    assert monitor.latest.metrics() == first.latest.metrics()
    assert monitor.latest.params == first.latest.params
