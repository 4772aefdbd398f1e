"""What FSDP2Strategy's resume decides about a loaded optimizer state, on plain tensors in one process (the same
functions run on DTensor shards in ``test_fsdp2_resume_distributed.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_precision.errors import OptimizerStateError
from lightning_precision.strategies import fsdp2_resume
from tests.helpers import adamw_state

PATH = Path("ckpt")


def test_state_saved_for_other_parameter_groups_is_refused():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    osd = {"state": adamw_state(model), "param_groups": [{"params": ["weight", "bias"], "lr": 1e-3}]}
    with pytest.raises(OptimizerStateError, match="1 param groups, the optimizer 2"):
        fsdp2_resume._keyed_by_index(optimizer, osd, dict(model.named_parameters()), "AdamW")
