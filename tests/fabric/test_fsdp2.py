"""fsdp2_parallelize without processes: the plan, option validation, and what it refuses at sharding time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_precision import PrecisionConfigError
from lightning_precision.fabric import FSDP2Parallelize, fsdp2_parallelize
from lightning_precision.strategies import FSDP2Strategy, resolve_fsdp2_precision


@pytest.mark.parametrize(
    ("precision", "optimizer", "storage"),
    [
        ("bf16-mixed", "torch.optim.AdamW", torch.float32),
        ("bf16-mixed", None, torch.float32),
        ("bf16-true", "torch.optim.AdamW", torch.bfloat16),
        ("32-true", "torch.optim.AdamW", torch.float32),
    ],
)
def test_plan_is_the_fsdp2_strategy_decision(precision, optimizer, storage):
    fn = fsdp2_parallelize(precision, optimizer=optimizer)
    assert isinstance(fn, FSDP2Parallelize)
    assert fn.plan == resolve_fsdp2_precision(precision, optimizer=optimizer)
    assert fn.plan == FSDP2Strategy(optimizer=optimizer).plan(fn.plan.mode)
    assert fn.plan.storage_dtype == storage


def test_contradicting_options_are_refused_when_built():
    with pytest.raises(PrecisionConfigError, match="storage_dtype"):
        fsdp2_parallelize("bf16-true", storage_dtype="float32")
    with pytest.raises(PrecisionConfigError, match="blocks="):
        fsdp2_parallelize(blocks=3)
    with pytest.raises(PrecisionConfigError, match="fp32_modules"):
        fsdp2_parallelize(fp32_modules=[3])
    with pytest.raises(PrecisionConfigError, match="not a precision"):
        fsdp2_parallelize("bf17-mixed")


def test_true_plan_refuses_a_model_the_plugin_did_not_cast(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with pytest.raises(PrecisionConfigError, match="HalfPrecisionForAudio.*bf16-true"):
        fsdp2_parallelize("bf16-true")(nn.Sequential(nn.Linear(2, 2)), mesh)


def test_mixed_plan_casts_storage_then_shards(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(torch.bfloat16)  # loaded in bf16 by accident
    fsdp2_parallelize("bf16-mixed", optimizer="torch.optim.AdamW")(model, mesh)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())


def test_tensor_parallel_mesh_is_refused_with_the_strategy_fix():
    class TwoDimMesh:  # Fabric's default mesh on one node: data-parallel 1, tensor-parallel = devices
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str):
            return type("Sub", (), {"size": lambda self: 2 if name == "tensor_parallel" else 1})()

    model = nn.Linear(2, 2)
    with pytest.raises(PrecisionConfigError, match="tensor_parallel_size=1"):
        fsdp2_parallelize()(model, TwoDimMesh())
    assert model.weight.dtype == torch.float32 and not hasattr(model, "_fsdp_state")
