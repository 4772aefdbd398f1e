"""The optimizer catalogue: classification from instances, classes, paths and configs."""

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from lightning_precision.catalogue import OptimizerKind, classify_optimizer
from lightning_precision.errors import PrecisionConfigError

FOLLOWS, MASTER, COMP, UNKNOWN = (
    OptimizerKind.STATE_FOLLOWS_PARAM,
    OptimizerKind.KEEPS_MASTER,
    OptimizerKind.COMPENSATED,
    OptimizerKind.UNKNOWN,
)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("torch.optim.AdamW", FOLLOWS),
        ("torch.optim.adamw.AdamW", FOLLOWS),
        (torch.optim.SGD, FOLLOWS),
        ({"_target_": "torch.optim.Adam", "lr": 1e-3}, FOLLOWS),
        ({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, FOLLOWS),
        ({"_target_": "flashoptim.FlashAdamW"}, MASTER),  # master_weight_bits defaults to 24
        ({"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 32}, MASTER),
        ({"_target_": "flashoptim.FlashAdamW", "master_weight_bits": None}, FOLLOWS),
        ({"_target_": "optimi.AdamW", "lr": 1e-3}, COMP),  # kahan_sum=None: automatic for half params
        ({"_target_": "optimi.AdamW", "kahan_sum": False}, FOLLOWS),
        ({"_target_": "transformer_engine.pytorch.optimizers.FusedAdam", "master_weights": True}, MASTER),
        ({"_target_": "transformer_engine.pytorch.optimizers.FusedAdam"}, FOLLOWS),
        ({"_target_": "torchao.optim._AdamW", "bf16_stochastic_round": True}, COMP),
        ("my_lab.optim.Shampoo", UNKNOWN),
    ],
)
def test_classify_config_and_paths(spec, kind):
    assert classify_optimizer(spec).kind is kind


def test_classify_same_class_under_two_paths_agrees():
    assert classify_optimizer("torch.optim.AdamW") == classify_optimizer("torch.optim.adamw.AdamW")


def test_classify_omegaconf_node():
    assert classify_optimizer(OmegaConf.create({"_target_": "torch.optim.AdamW"})).kind is FOLLOWS


def test_classify_instance_reads_what_it_keeps():
    flashoptim = pytest.importorskip("flashoptim")
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = flashoptim.FlashAdamW([p], quantize=False, master_weight_bits=None, fused=False)
    assert classify_optimizer(opt).kind is FOLLOWS
    assert classify_optimizer(torch.optim.AdamW([p])).beta2 == 0.999


class DeclaresMaster(torch.optim.SGD):
    keeps_master_weights = True


class DeclaresCompensation(torch.optim.SGD):
    compensated_update = True


@pytest.mark.parametrize(("cls", "kind"), [(DeclaresMaster, MASTER), (DeclaresCompensation, COMP)])
def test_optimizer_can_declare_itself(cls, kind):
    assert classify_optimizer(cls).kind is kind
    assert classify_optimizer(cls([torch.nn.Parameter(torch.zeros(1))], lr=0.1)).kind is kind


@pytest.mark.parametrize("bad", [42, {"lr": 1e-3}])
def test_classify_rejects_what_is_not_an_optimizer(bad):
    with pytest.raises(PrecisionConfigError):
        classify_optimizer(bad)


# -- one answer for every spelling of the same optimizer ---------------------------------------------------------------


def _spellings(path: str, cls: type, **kwargs):
    """A live instance, the class with its arguments, a Hydra config and a LightningCLI config of one optimizer."""
    instance = cls([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], **kwargs)
    return {
        "instance": classify_optimizer(instance),
        "class": classify_optimizer(cls, kwargs),
        "path": classify_optimizer(path, kwargs),
        "hydra": classify_optimizer({"_target_": path, **kwargs}),
        "lightning_cli": classify_optimizer({"class_path": path, "init_args": kwargs}),
    }


@pytest.mark.parametrize("stochastic_round", [True, False])
def test_torchao_stochastic_rounding_is_judged_alike_live_and_as_config(stochastic_round):
    torchao_optim = pytest.importorskip("torchao.optim", reason="torchao is a test extra")
    seen = _spellings("torchao.optim._AdamW", torchao_optim._AdamW, bf16_stochastic_round=stochastic_round)
    kinds = {name: info.kind for name, info in seen.items()}
    expected = COMP if stochastic_round else FOLLOWS
    assert kinds == dict.fromkeys(seen, expected)
    assert len({info.reason for info in seen.values()}) == 1


@pytest.mark.parametrize(
    ("path", "kwargs", "kind"),
    [
        ("torch.optim.AdamW", {}, FOLLOWS),
        ("optimi.AdamW", {"lr": 1e-3, "kahan_sum": True}, COMP),
        ("optimi.AdamW", {"lr": 1e-3, "kahan_sum": False}, FOLLOWS),
        ("lightning_precision.optim.CompensatedAdamW", {}, COMP),
    ],
)
def test_every_spelling_of_an_optimizer_gets_one_classification(path, kwargs, kind):
    from lightning_precision._imports import import_object

    seen = _spellings(path, import_object(path, where="test"), **kwargs)
    assert {info.kind for info in seen.values()} == {kind}
    assert len({(info.moments, info.exp_avg_sq_dtype, info.compensation_buffer) for info in seen.values()}) == 1


def test_state_text_predicts_what_the_optimizer_then_keeps():
    from lightning_precision.optim import CompensatedAdamW
    from lightning_precision.report import observed_state_dtypes

    param = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    optimizer = CompensatedAdamW([param])
    predicted = classify_optimizer(optimizer).state_text(torch.bfloat16)
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert observed_state_dtypes(optimizer, [param]) == predicted


def test_sgd_keeps_a_momentum_buffer_only_with_momentum():
    assert classify_optimizer("torch.optim.SGD", {"momentum": 0.9}).moments == ("momentum_buffer",)
    assert classify_optimizer("torch.optim.SGD").moments == ()
    assert classify_optimizer("torch.optim.AdamW").moments == ("exp_avg", "exp_avg_sq")


class _LabAdamW(torch.optim.AdamW):
    """A user's subclass that changes nothing about what AdamW keeps."""


class _LabCompensatedAdamW(torch.optim.AdamW):
    compensated_update = True


class _LabFromScratch(torch.optim.Optimizer):
    """Subclasses only the base class: nothing is known about what it keeps."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})


@pytest.mark.parametrize(
    "spec", [_LabAdamW, "tests.test_catalogue._LabAdamW", {"_target_": "tests.test_catalogue._LabAdamW"}]
)
def test_subclass_of_a_torch_optimizer_is_judged_as_its_base_and_says_so(spec):
    info = classify_optimizer(spec)
    assert info.kind is FOLLOWS and info.name == "tests.test_catalogue._LabAdamW"
    assert "subclasses torch.optim.adamw.AdamW" in info.reason
    assert info.moments == ("exp_avg", "exp_avg_sq")


def test_subclass_instance_is_judged_as_its_base():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    assert classify_optimizer(_LabAdamW([p])).kind is FOLLOWS


def test_subclass_that_declares_compensation_keeps_its_declaration():
    assert classify_optimizer(_LabCompensatedAdamW).kind is COMP


def test_direct_subclass_of_optimizer_stays_unknown():
    assert classify_optimizer(_LabFromScratch).kind is UNKNOWN


def test_optimizer_whose_import_raises_is_classified_by_its_path(tmp_path, monkeypatch):
    package = tmp_path / "broken_lab_optim"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('CUDA driver not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = classify_optimizer({"_target_": "broken_lab_optim.Shampoo"})
    assert info.kind is UNKNOWN and info.name == "broken_lab_optim.Shampoo"


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ({"_target_": "optimi.AdamW", "kahan_sum": "false"}, FOLLOWS),  # a YAML/env string, never truth-tested
        ({"_target_": "transformer_engine.pytorch.optimizers.FusedAdam", "master_weights": "false"}, FOLLOWS),
        ({"_target_": "torchao.optim._AdamW", "bf16_stochastic_round": "False"}, FOLLOWS),
    ],
)
def test_boolean_settings_written_as_strings_are_read_not_truth_tested(spec, kind):
    assert classify_optimizer(spec).kind is kind


def test_boolean_setting_that_is_not_a_boolean_is_refused():
    with pytest.raises(PrecisionConfigError, match="kahan_sum: 'sometimes'"):
        classify_optimizer({"_target_": "optimi.AdamW", "kahan_sum": "sometimes"})


@pytest.mark.parametrize("path", ["os.system", "builtins.print", "torch.optim"])
def test_non_class_optimizer_path_is_refused_naming_it(path):
    with pytest.raises(PrecisionConfigError, match=f"{path!r}.*not a class: expected a torch.optim.Optimizer subclass"):
        classify_optimizer(path)


@pytest.mark.parametrize("betas", [[0.9, "abc"], [0.9, 1.0], ["x", 0.999]])
def test_a_bad_beta_in_a_config_is_refused_naming_it(betas):
    bad = next(b for b in betas if not isinstance(b, float) or b >= 1)
    with pytest.raises(PrecisionConfigError, match=rf"betas\[{betas.index(bad)}\]: {bad!r}"):
        classify_optimizer({"_target_": "torch.optim.AdamW", "betas": betas})


def test_tensor_betas_of_a_live_optimizer_are_read_as_their_value():
    betas = (torch.tensor(0.9), torch.tensor(0.95))
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], betas=betas)
    assert classify_optimizer(optimizer).beta2 == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("settings", "text"),
    [
        ({}, "int8+scales (CUDA)"),  # flashoptim's defaults: quantize=True, master_weight_bits=24
        ({"quantize": False}, "bfloat16"),  # unquantized moments are stored in the parameter dtype
        ({"quantize": False, "master_weight_bits": None}, "bfloat16"),
    ],
)
def test_flash_adamw_state_text_is_what_flashoptim_stores(settings, text):
    info = classify_optimizer({"_target_": "flashoptim.FlashAdamW", **settings})
    assert info.state_text(torch.bfloat16) == text


def test_unquantized_flash_state_on_cpu_is_the_parameter_dtype_as_predicted():
    flashoptim = pytest.importorskip("flashoptim")
    from lightning_precision.report import observed_state_dtypes

    half, full = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flashoptim's own note on master_weight_bits=None
        optimizer = flashoptim.FlashAdamW([half, full], quantize=False, master_weight_bits=None, fused=False)
    for p in (half, full):
        p.grad = torch.randn_like(p)
    optimizer.step()
    info = classify_optimizer(optimizer)
    assert observed_state_dtypes(optimizer, [half]) == info.state_text(torch.bfloat16) == "bfloat16"
    assert observed_state_dtypes(optimizer, [full]) == info.state_text(torch.float32) == "float32"


def test_quantized_flash_state_is_read_without_touching_its_data():
    flashoptim = pytest.importorskip("flashoptim")
    from lightning_precision.catalogue.state import state_tensor

    quantized = flashoptim.optimizers._MaybeQuantizedTensor(None, try_quantize=False)
    quantized._quantized = torch.zeros(4, dtype=torch.int8)  # what set_data leaves on CUDA: no _data
    quantized._scales = torch.ones(1, dtype=torch.float16)
    assert state_tensor(quantized) is quantized._quantized


def _stepped_compensated(**kwargs):
    from lightning_precision.optim import CompensatedAdamW

    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)) for _ in range(2)]
    optimizer = CompensatedAdamW([{"params": [params[0]]}, {"params": [params[1]], **kwargs}])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer


def test_a_live_optimizer_is_classified_by_the_options_its_groups_hold_after_a_load():
    from lightning_precision import Status, judge

    saved = _stepped_compensated()
    for group in (saved_dict := saved.state_dict())["param_groups"]:
        group["exp_avg_sq_rounding"] = "nearest"  # a checkpoint of a run that asked for it
    resumed = _stepped_compensated()  # built with the stochastic default
    resumed.load_state_dict(saved_dict)
    info = classify_optimizer(resumed)
    assert "exp_avg_sq" not in info.stochastic_moments
    assert judge(torch.bfloat16, info).status is Status.WEAK_STATE


def test_a_stochastic_moment_is_claimed_only_where_every_group_has_one():
    mixed = _stepped_compensated(exp_avg_sq_rounding="nearest")  # group 1 only
    assert "exp_avg_sq" not in classify_optimizer(mixed).stochastic_moments
    assert "exp_avg_sq" in classify_optimizer(_stepped_compensated()).stochastic_moments
