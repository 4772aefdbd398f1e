"""Property: `explain` on any generated config gives a verdict or one clear error line, never a traceback.

The configs mix valid and broken values where users write them (precision strings, optimizer paths and options,
trainer values, strategies, plugins, callbacks) in the Lightning, NeMo and Hydra layouts the command reads.
"""

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_precision import cli

EXIT_CODES = (0, 1, 2)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mostly(valid):
    """``valid`` five times in six, else junk: most configs get far enough to be judged."""
    return st.one_of(*[valid] * 5, junk)


precisions = mostly(
    st.sampled_from(
        ["32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16-flash", "bf16", "16", 32, "64-true",
         "BF16-TRUE", "bf16-mixed ", "transformer-engine", "fp8"]
    )
)  # fmt: skip
optimizer_paths = mostly(
    st.sampled_from(
        ["torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "lightning_precision.optim.CompensatedAdamW",
         "flashoptim.FlashAdamW", "os.system", "builtins.print", "torch.optim", "no.such.Optimizer", "AdamW", ""]
    )
)  # fmt: skip
optimizer_options = st.dictionaries(
    st.sampled_from(["lr", "betas", "eps", "weight_decay", "maximize", "exp_avg_dtype", "master_weight_bits", "lrr"]),
    mostly(st.one_of(st.floats(0, 1), st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)).map(list))),
    max_size=3,
)
optimizers = mostly(
    st.one_of(
        st.fixed_dictionaries({"class_path": optimizer_paths}, optional={"init_args": optimizer_options}),
        st.fixed_dictionaries({"_target_": optimizer_paths}).flatmap(
            lambda d: optimizer_options.map(lambda opts: {**d, **opts})
        ),
        st.fixed_dictionaries({"name": st.sampled_from(["adamw", "adam", "sgd", "fused_adam", "novograd"])}).flatmap(
            lambda d: optimizer_options.map(lambda opts: {**d, **opts})
        ),
    )
)
components = st.one_of(
    st.fixed_dictionaries(
        {"class_path": st.one_of(st.sampled_from(["os.system", "lightning.pytorch.callbacks.ModelCheckpoint"]), junk)},
        optional={"init_args": st.dictionaries(st.text(max_size=4), junk, max_size=2)},
    ),
    st.fixed_dictionaries({"_target_": st.one_of(st.just("os.system"), junk), "precision": precisions}),
    junk,
)
trainers = st.fixed_dictionaries(
    {},
    optional={
        "precision": precisions,
        "max_steps": mostly(st.integers(-1, 10)),
        "devices": mostly(st.sampled_from([1, 2, "auto", [0]])),
        "strategy": st.one_of(st.sampled_from(["auto", "ddp", "fsdp", "model_parallel"]), components),
        "plugins": st.one_of(components, st.lists(components, max_size=2)),
        "callbacks": st.one_of(components, st.lists(components, max_size=2)),
    },
)
configs = mostly(
    st.fixed_dictionaries({"trainer": mostly(trainers)}, optional={"model": st.one_of(
        st.fixed_dictionaries({}, optional={"optimizer": optimizers, "optim": optimizers, "torch_dtype": junk}),
        junk,
    ), "optimizer": optimizers}),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs)
def test_explain_gives_a_verdict_or_one_clear_error_line(tmp_path, capsys, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli.main(["explain", str(path)])
    _, err = capsys.readouterr()
    assert code in EXIT_CODES
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lightning-precision: error:"), err


valid_precisions = st.sampled_from(["32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "32", "bf16", 32])
adam_options = st.fixed_dictionaries(
    {"lr": st.floats(1e-6, 1.0)},
    optional={"betas": st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)).map(list), "weight_decay": st.floats(0, 1)},
)
lightning_optimizers = st.one_of(
    st.builds(
        lambda path, opts: {"class_path": path, "init_args": opts},
        st.sampled_from(["torch.optim.AdamW", "torch.optim.Adam", "lightning_precision.optim.CompensatedAdamW"]),
        adam_options,
    ),
    st.builds(lambda opts: {"class_path": "torch.optim.SGD", "init_args": opts}, st.fixed_dictionaries({"lr": st.floats(1e-6, 1.0)})),
)  # fmt: skip
nemo_optimizers = st.builds(lambda name, opts: {"name": name, **opts}, st.sampled_from(["adamw", "adam"]), adam_options)
valid_configs = st.builds(
    lambda precision, model: {"trainer": {"precision": precision}, "model": model},
    valid_precisions,
    st.one_of(
        lightning_optimizers.map(lambda optimizer: {"optimizer": optimizer}),
        nemo_optimizers.map(lambda optim: {"optim": optim}),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=valid_configs)
def test_explain_judges_every_valid_config(tmp_path, capsys, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli.main(["explain", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    assert "Traceback" not in err
    assert json.loads(out)
