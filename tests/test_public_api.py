"""The public API given arguments of the wrong type: a clear error at the entry, never a raw one from inside."""

import pytest
import torch

import lightning_precision as lp
from lightning_precision.errors import PrecisionConfigError

_INFO = lp.classify_optimizer("torch.optim.AdamW")
_BATCH = {"x": torch.zeros(2)}
_WRONG = [None, 7, [1, 2]]

# (public call, the argument it names, the values to try)
_CASES = [
    (lambda v: lp.resolve_trainer_cfg(v), "trainer", _WRONG),
    (lambda v: lp.resolve_trainer_cfg({}, model=v), "model", [7, [1, 2]]),
    (lambda v: lp.resolve_trainer_cfg({}, optimizer=v), "optimizer", [7, [1, 2]]),
    (lambda v: lp.plan_trainer_cfg(v), "trainer", _WRONG),
    (lambda v: lp.read_precision_contract(v), "checkpoint", _WRONG),
    (lambda v: lp.PrecisionContract.from_dict(v), "data", _WRONG),
    (lambda v: lp.export_weights(v, "unused"), "checkpoint", _WRONG),
    (lambda v: lp.export_weights("unused.ckpt", v), "output_dir", _WRONG),
    (lambda v: lp.check_optimizer(v), "optimizer", [*_WRONG, "torch.optim.AdamW"]),
    (lambda v: lp.classify_optimizer("torch.optim.AdamW", v), "kwargs", [7, [1, 2]]),
    (lambda v: lp.decide_storage(precision=v), "precision", [[1, 2], 1.5]),
    (lambda v: lp.judge(v, _INFO), "storage_dtype", [7, [1, 2], "bf16"]),
    (lambda v: lp.judge(torch.bfloat16, v), "optimizer", [7, [1, 2], "torch.optim.AdamW"]),
    (lambda v: lp.judge(torch.bfloat16, _INFO, precision=v), "precision", [7, [1, 2]]),
    (lambda v: lp.cast_batch(_BATCH, v), "dtype", [*_WRONG, "bf16", torch.int64]),
    (lambda v: lp.cast_batch(_BATCH, torch.bfloat16, v), "preserve_keys", [1.5, object()]),
    (lambda v: lp.CompensatedAdamW(v), "params", [None, 7, 1.5]),
    (lambda v: lp.CompensatedAdamW([{"params": v}]), "params", [None, 7]),
    (lambda v: lp.CompensatedAdamW([torch.zeros(1)]).add_param_group(v), "param group 1", [None, 7, [1, 2]]),
    (lambda v: lp.AtomicCheckpointIO().load_checkpoint(v), "checkpoint path", [None, 7]),
    (lambda v: lp.export_weights("unused.ckpt", "unused", strip_prefix=v), "strip_prefix", [7, [1, 2]]),
    (lambda v: lp.PrecisionContract.from_dict({"optimizers": v}), "optimizers", [None, 7]),
    (lambda v: lp.PrecisionContract.from_dict({"optimizers": [v]}), "optimizers", [None, 7]),
    (lambda v: lp.UpdateUnderflowMonitor(seed=v), "seed", [None, [1, 2]]),
    (lambda v: lp.HalfPrecisionForAudio(fp32_modules=v), "fp32_modules", [7, 1.5]),
    (lambda v: lp.FSDP2Strategy(fp32_modules=v), "fp32_modules", [7, 1.5]),
]
_PARAMS = [
    pytest.param(call, name, value, id=f"{i}-{name}-{type(value).__name__}")
    for i, (call, name, values) in enumerate(_CASES)
    for value in values
]


@pytest.mark.parametrize(("call", "argument", "value"), _PARAMS)
def test_wrong_type_names_the_argument_what_it_got_and_what_it_expects(call, argument, value):
    with pytest.raises((TypeError, PrecisionConfigError)) as caught:
        call(value)
    message = str(caught.value)
    assert argument in message
    assert type(value).__name__ in message or repr(value) in message
    assert any(word in message for word in ("expect", "must be", "missing", "not a", "give"))
