"""Which modules become FSDP units."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_precision.strategies import select_blocks
from lightning_precision.strategies.parallelize import top_level_units

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
