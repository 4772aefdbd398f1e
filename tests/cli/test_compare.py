"""lightning-precision compare: the table, the plot and the results file, and a crashing recipe."""

import json
import sys

import pytest

from tests.cli.helpers import run


def test_compare_prints_the_table_and_writes_the_plot(capsys, tmp_path, task):
    code, out, _ = run(
        capsys,
        "compare",
        "--steps",
        "6",
        "--recipes",
        "32-true",
        "bf16-true+adamw",
        "bf16-flash",
        "--output-dir",
        tmp_path,
    )
    assert code == 0
    lines = out.splitlines()
    header = lines[1].split()
    assert header == [
        "recipe",
        "storage",
        "optimizer",
        "optimizer",
        "state",
        "final",
        "loss",
        "vs",
        "fp32",
        "bytes/param",
        "peak",
        "s/step",
    ]
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert rows["32-true"][1:4] == ["float32", "torch.AdamW", "float32"]
    assert rows["32-true"][5] == "1.000x" and rows["32-true"][6] == "16.0"
    assert rows["32-true"][7] == "16.0"  # torch AdamW's default step on CPU is the per-tensor loop
    assert rows["bf16-true+adamw"][1] == "bfloat16" and rows["bf16-true+adamw"][3] == "bfloat16"
    import torch

    if not torch.cuda.is_available():  # never faked on CPU: listed as skipped, with the reason below the table
        assert rows["bf16-flash"][4] == "skipped" and "bf16-flash: skipped: needs CUDA" in out
    assert (tmp_path / "compare_loss.png").stat().st_size > 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [len(r["losses"]) for r in data["results"][:2]] == [6, 6]


def test_compare_exits_1_when_a_recipe_crashes(capsys, tmp_path, task, monkeypatch):
    from lightning_precision.cli import compare

    broken = compare.Recipe("broken", "32-true", {"_target_": "no_such_module.AdamW"})
    monkeypatch.setitem(compare.RECIPES, "broken", broken)
    code, out, _ = run(capsys, "compare", "--steps", "2", "--recipes", "broken", "--output-dir", tmp_path)
    assert code == 1
    assert "broken: crashed:" in out


def test_compare_without_matplotlib_prints_the_table_and_how_to_get_the_plot(capsys, tmp_path, task, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when it is not installed
    code, out, _ = run(capsys, "compare", "--steps", "2", "--recipes", "32-true", "--output-dir", tmp_path)
    assert code == 0
    assert out.splitlines()[3].split()[:4] == ["32-true", "float32", "torch.AdamW", "float32"]
    [hint] = [line for line in out.splitlines() if "matplotlib" in line]
    assert 'pip install "lightning_precision[plot]"' in hint
    assert not (tmp_path / "compare_loss.png").exists() and (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"threads": -1}, "threads: -1"),
        ({"threads": 1.5}, "threads: 1.5"),
        ({"steps": 0}, "steps: 0"),
        ({"seed": "abc"}, "seed: 'abc'"),
        ({"recipes": ["bf16-tru"]}, "'bf16-tru'"),
        ({"recipes": "32-true"}, "'32-true'"),
    ],
)
def test_run_compare_refuses_a_bad_value_before_training(tmp_path, kwargs, named):
    from lightning_precision.cli.compare import RECIPES, run_compare
    from lightning_precision.errors import PrecisionConfigError

    with pytest.raises(PrecisionConfigError) as err:
        run_compare(output_dir=tmp_path, progress=lambda line: pytest.fail(f"a recipe ran: {line}"), **kwargs)
    assert named in str(err.value)
    if "recipes" in kwargs:
        assert all(name in str(err.value) for name in RECIPES)
