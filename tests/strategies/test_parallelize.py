"""Which modules become FSDP units."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_precision.strategies import select_blocks
from lightning_precision.strategies.parallelize import parallelize, tied_groups, top_level_units

# -- block selection --------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.extra = nn.ModuleDict({"head": nn.Linear(4, 1)})
        self.act = nn.ReLU()


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        (None, ["layers.1", "layers.0"]),
        ("Block", ["layers.1", "layers.0"]),
        (["Linear"], ["extra.head", "layers.1.fc", "layers.0.fc", "embed"]),
        (lambda name, module: name == "embed", ["embed"]),
    ],
    ids=["default-modulelist-children", "class-name", "class-names", "callable"],
)
def test_select_blocks(blocks, expected):
    assert [name for name, _ in select_blocks(Net(), blocks)] == expected


def test_top_level_units_look_through_containers_and_skip_parameterless_modules():
    assert [name for name, _ in top_level_units(Net())] == ["embed", "layers.0", "layers.1", "extra.head"]


# -- tied weights -----------------------------------------------------------------------------------------------------


class CallableBlock(Block):
    def forward(self, x):
        return self.fc(x)


class TiedLM(nn.Module):
    """An embedding tied to the output head, both direct children (as in a small hand-written LM)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(CallableBlock() for _ in range(2))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_tied_groups_put_modules_sharing_a_parameter_together():
    model = TiedLM()
    groups = [[name for name, _ in g] for g in tied_groups(top_level_units(model))]
    assert groups == [["embed", "head"], ["layers.0"], ["layers.1"], ["norm"]]


def test_tied_groups_join_two_groups_a_module_is_tied_to():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    both = nn.Module()
    both.wa, both.wb = a.weight, b.weight
    groups = tied_groups([("a", a), ("b", b), ("both", both)])
    assert [[name for name, _ in g] for g in groups] == [["a", "b", "both"]]


def test_parallelize_shards_tied_weights_in_one_group_and_trains(single_rank_group):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = TiedLM()
    units = parallelize(model, init_device_mesh("cpu", (1,)), MixedPrecisionPolicy())
    assert {"embed", "head"} <= set(units)
    assert model.head.weight is model.embed.weight  # still one parameter
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embed.weight.grad is not None


def test_blocks_that_split_a_tied_weight_are_refused_naming_both(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lightning_precision.errors import PrecisionConfigError

    with pytest.raises(
        PrecisionConfigError, match=r"tied between 'head' and 'embed'.*Select a block that contains both"
    ):
        parallelize(TiedLM(), init_device_mesh("cpu", (1,)), MixedPrecisionPolicy(), blocks=["Embedding", "Linear"])
