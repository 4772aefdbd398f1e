"""``lightning-precision compare``: the built-in task under several precision recipes, side by side.

Every recipe trains the same model from the same initial weights on the same data in the same order; only the
precision and the optimizer differ. Each recipe goes through the library's own path
(:func:`~lightning_precision.cli.train.fit_task` -> :func:`~lightning_precision.config.resolve_trainer_cfg`), and
the table is filled from the live run: parameter and optimizer-state dtypes are read from the tensors after
training, bytes per parameter are measured from them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_precision.cli.plot import PlotUnavailableError, plot_losses
from lightning_precision.demos import DEFAULT_LAST_K, DEFAULT_MAX_STEPS
from lightning_precision.dtypes import dtype_name
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.memory import PEAK_DEFINITION
from lightning_precision.values import PATH_TYPES, expect_type, parse_number

REFERENCE = "32-true"
COMPENSATED_OPTIMIZER = "lightning_precision.optim.CompensatedAdamW"
_ADAM_ARGS = {"weight_decay": 0.0}
# The task's matrices are tiny: a second intra-op thread only adds synchronization. Measured on 2 shared cores,
# one thread ran 5 ms/step against 46-57 ms/step with two.
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Recipe:
    """One precision recipe.

    Attributes:
        name: Short name used on the command line.
        precision: The trainer's precision string.
        optimizer: ``_target_`` and keyword arguments (without ``lr``: the task's default is used).
        on_unsafe: The pairing policy; the trap runs under ``"warn"`` so it proceeds with one warning.
        needs_cuda: Whether the recipe can only run on a CUDA device.
        why_cuda: Why, for the skip message.
    """

    name: str
    precision: str
    optimizer: dict[str, Any]
    on_unsafe: str = "error"
    needs_cuda: bool = False
    why_cuda: str = ""


def _recipes() -> dict[str, Recipe]:
    adamw = {"_target_": "torch.optim.AdamW", **_ADAM_ARGS}
    return {
        r.name: r
        for r in (
            Recipe("32-true", "32-true", adamw),
            Recipe("bf16-mixed", "bf16-mixed", adamw),
            Recipe("bf16-true+adamw", "bf16-true", adamw, on_unsafe="warn"),
            Recipe("bf16-true+compensated", "bf16-true", {"_target_": COMPENSATED_OPTIMIZER, **_ADAM_ARGS}),
            Recipe(
                "bf16-flash",
                "bf16-flash",
                {"_target_": "flashoptim.FlashAdamW", "master_weight_bits": 24, **_ADAM_ARGS},
                needs_cuda=True,
                why_cuda="flashoptim's error-correction bits (master_weight_bits=24) and quantized moments are "
                "CUDA-only",
            ),
        )
    }


RECIPES: dict[str, Recipe] = _recipes()
DEFAULT_RECIPES: tuple[str, ...] = tuple(RECIPES)


@dataclass
class RecipeResult:
    """What one recipe did.

    Attributes:
        recipe: The recipe.
        status: ``"ok"``, ``"skipped"`` or ``"crashed"``.
        reason: Why it was skipped or how it crashed.
        storage_dtype: Dtype of the trainable parameters after training.
        optimizer: Optimizer class name.
        state_dtype: Moment dtypes read from the live optimizer state.
        losses: Loss of every step.
        final_loss: Mean of the last ``last_k`` losses.
        last_k: How many steps ``final_loss`` averages.
        bytes_per_param: Measured params + grads + optimizer state bytes per trainable parameter (steady state).
        peak_bytes_per_param: ``bytes_per_param`` plus the catalogue's estimate of what the optimizer step allocates
            on top (``None`` when the catalogue cannot size it).
        seconds_per_step: Wall-clock seconds per optimizer step (first step excluded: it allocates state).
    """

    recipe: Recipe
    status: str = "ok"
    reason: str = ""
    storage_dtype: str = "-"
    optimizer: str = "-"
    state_dtype: str = "-"
    losses: list[float] = field(default_factory=list)
    final_loss: float | None = None
    last_k: int = 0
    bytes_per_param: float | None = None
    peak_bytes_per_param: float | None = None
    seconds_per_step: float | None = None


@dataclass
class CompareReport:
    """All recipes' results and where the plot and data went.

    Attributes:
        results: One result per recipe, in the order they ran.
        steps: Optimizer steps per recipe.
        seed: Seed of data, data order and initial weights.
        threads: ``torch.set_num_threads`` value the recipes ran with.
        seconds: Wall-clock seconds of the whole comparison.
        plot_path: The loss-curve PNG, if one was written.
        plot_unavailable: Why no plot was written and how to get one (matplotlib missing), else empty.
        json_path: The results JSON, once written.
    """

    results: list[RecipeResult]
    steps: int
    seed: int
    threads: int
    seconds: float
    plot_path: Path | None = None
    plot_unavailable: str = ""
    json_path: Path | None = None

    @property
    def ok(self) -> bool:
        """No recipe crashed (skipped ones are fine)."""
        return all(r.status != "crashed" for r in self.results)

    def reference_loss(self) -> float | None:
        """Final loss of the fp32 reference, if it ran."""
        ref = next((r for r in self.results if r.recipe.name == REFERENCE and r.status == "ok"), None)
        return ref.final_loss if ref else None

    def rows(self) -> list[dict[str, str]]:
        """The table rows as strings, column name -> cell."""
        ref = self.reference_loss()
        rows = []
        for r in self.results:
            ok = r.status == "ok"
            rows.append(
                {
                    "recipe": r.recipe.name,
                    "storage": r.storage_dtype if ok else "-",
                    "optimizer": r.optimizer,
                    "optimizer state": r.state_dtype if ok else "-",
                    "final loss": f"{r.final_loss:.4g}" if ok and r.final_loss is not None else r.status,
                    "vs fp32": f"{r.final_loss / ref:.3f}x" if ok and ref and r.final_loss is not None else "-",
                    "bytes/param": f"{r.bytes_per_param:.1f}" if ok and r.bytes_per_param is not None else "-",
                    "peak": f"{r.peak_bytes_per_param:.1f}" if ok and r.peak_bytes_per_param is not None else "-",
                    "s/step": f"{r.seconds_per_step * 1000:.1f}ms" if ok and r.seconds_per_step else "-",
                }
            )
        return rows

    def format_text(self) -> str:
        """The table, notes on skipped/crashed recipes, and where the plot is."""
        rows = self.rows()
        head = list(rows[0]) if rows else []
        widths = [max(len(h), *(len(row[h]) for row in rows)) for h in head]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        k = max((r.last_k for r in self.results), default=0)
        title = (
            f"lightning-precision compare: built-in task, {self.steps} steps per recipe, seed {self.seed}, "
            f"{self.threads} torch thread(s); final loss = mean of the last {k} steps"
        )
        out = [
            title,
            line(head),
            line(["-" * w for w in widths]),
            *(line([row[h] for h in head]) for row in rows),
        ]
        out += [f"{r.recipe.name}: {r.status}: {r.reason}" for r in self.results if r.status != "ok"]
        # The same definition as `explain` prints (memory.PEAK_DEFINITION); the device is where the recipe ran.
        out.append(
            "bytes/param: params + grads + every optimizer-state tensor, measured after training, on the device each "
            f"recipe ran on (CPU, CUDA for bf16-flash). {PEAK_DEFINITION} (the step's part is the catalogue's "
            "estimate; benchmarks/optimizer_step.py measures it)."
        )
        if self.plot_path is not None:
            out.append(f"Loss curves: {self.plot_path}")
        elif self.plot_unavailable:
            out.append(self.plot_unavailable)
        if self.json_path is not None:
            out.append(f"Results: {self.json_path}")
        out.append(f"Total time: {self.seconds:.1f} s")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, written next to the plot."""
        return {
            "steps": self.steps,
            "seed": self.seed,
            "threads": self.threads,
            "seconds": self.seconds,
            "reference_loss": self.reference_loss(),
            "rows": self.rows(),
            "results": [
                {
                    "recipe": r.recipe.name,
                    "precision": r.recipe.precision,
                    "optimizer_config": r.recipe.optimizer,
                    "status": r.status,
                    "reason": r.reason,
                    "storage_dtype": r.storage_dtype,
                    "state_dtype": r.state_dtype,
                    "final_loss": r.final_loss,
                    "bytes_per_param": r.bytes_per_param,
                    "peak_bytes_per_param": r.peak_bytes_per_param,
                    "seconds_per_step": r.seconds_per_step,
                    "losses": r.losses,
                }
                for r in self.results
            ],
        }


def recipe_config(recipe: Recipe, steps: int, seed: int, accelerator: str = "cpu") -> dict[str, Any]:
    """The run config of one recipe: a quiet trainer, the task's own model and data defaults."""
    return {
        "trainer": {
            "precision": recipe.precision,
            "accelerator": accelerator,
            "devices": 1,
            "max_steps": steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "lightning_precision": {"on_unsafe": recipe.on_unsafe},
        },
        "model": {"torch_dtype": "auto"},
        "optimizer": dict(recipe.optimizer),
        "data": {},
        "seed": seed,
    }


def run_compare(
    recipes: Sequence[str] = DEFAULT_RECIPES,
    steps: int | None = None,
    seed: int = 0,
    output_dir: Path = Path("runs/compare"),
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompareReport:
    """Train the built-in task under each recipe and collect the comparison.

    Args:
        recipes: Recipe names (keys of :data:`RECIPES`).
        steps: Optimizer steps per recipe (default: the built-in task's ``DEFAULT_MAX_STEPS``).
        seed: Seed of data, data order and initial weights, the same for every recipe.
        output_dir: Where the loss plot (PNG) and the results (JSON) are written.
        threads: ``torch.set_num_threads`` value (default :data:`DEFAULT_THREADS`), fixed so timings and results
            reproduce.
        progress: Called with one line per recipe as it starts and ends (default: print to stderr).

    Returns:
        The report; ``report.ok`` is false if a recipe crashed.

    Raises:
        PrecisionConfigError: If ``steps`` or ``threads`` is not an int >= 1, ``seed`` not an int >= 0, or a recipe
            is unknown (the message names the value and the valid choices).
        TypeError: If ``output_dir`` is not a path.
    """
    steps = parse_number(steps, what="steps", integer=True, low=1) if steps is not None else DEFAULT_MAX_STEPS
    threads = parse_number(threads, what="threads", integer=True, low=1) if threads is not None else DEFAULT_THREADS
    seed = parse_number(seed, what="seed", integer=True, low=0)
    expect_type(output_dir, PATH_TYPES, what="run_compare(output_dir=...)", expected="a directory path")
    output_dir = Path(output_dir)
    unknown = [name for name in recipes if name not in RECIPES]
    if isinstance(recipes, str) or unknown:
        shown = recipes if isinstance(recipes, str) else unknown
        raise PrecisionConfigError(f"Unknown recipe(s) {shown!r}; valid choices: {', '.join(RECIPES)}.")
    torch.set_num_threads(threads)
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    results = []
    with quiet_lightning():
        for i, name in enumerate(recipes, 1):
            say(f"[{i}/{len(recipes)}] {name} ...")
            result = run_recipe(RECIPES[name], steps, seed)
            detail = f"final loss {result.final_loss:.4g}" if result.status == "ok" else result.reason
            say(f"[{i}/{len(recipes)}] {name}: {result.status} ({detail})")
            results.append(result)
    report = CompareReport(results, steps, seed, threads, seconds=0.0)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        report.plot_path = plot_losses(results, output_dir / "compare_loss.png", report.reference_loss())
    except PlotUnavailableError as err:  # the plot is optional (the `plot` extra); the table is the result
        report.plot_unavailable = str(err)
    report.seconds = time.perf_counter() - start
    report.json_path = output_dir / "compare.json"
    report.json_path.write_text(json.dumps(report.to_dict(), indent=1))
    return report


def run_recipe(recipe: Recipe, steps: int, seed: int) -> RecipeResult:
    """Train one recipe and read what it did from the live model and optimizer; never raises."""
    if recipe.needs_cuda and not torch.cuda.is_available():
        return RecipeResult(recipe, status="skipped", reason=f"needs CUDA ({recipe.why_cuda}); no CUDA device here")
    from lightning_precision.cli.train import fit_task

    timer = _StepTimer()
    accelerator = "cuda" if recipe.needs_cuda else "cpu"
    try:
        run = fit_task(recipe_config(recipe, steps, seed, accelerator), extra_callbacks=[timer])
    except Exception as err:  # noqa: BLE001 - a crashing recipe is reported in the table; the command exits 1
        return RecipeResult(recipe, status="crashed", reason=f"{type(err).__name__}: {' '.join(str(err).split())}")
    return _result_from_run(recipe, run, timer)


def _result_from_run(recipe: Recipe, run: Any, timer: _StepTimer) -> RecipeResult:
    from lightning_precision.memory import measure_bytes_per_param
    from lightning_precision.pairing import judged_params
    from lightning_precision.report import observed_state_dtypes

    optimizer = run.trainer.optimizers[0]
    judged = judged_params(optimizer)
    losses = list(run.module.step_losses)
    memory = measure_bytes_per_param(optimizer)
    # The task's window, shrunk for short runs so the mean is over their end and not over the whole run.
    last_k = min(DEFAULT_LAST_K, max(1, len(losses) // 10))
    return RecipeResult(
        recipe,
        storage_dtype=dtype_name(judged[0].dtype) if judged else "-",
        optimizer=_optimizer_name(optimizer),
        state_dtype=observed_state_dtypes(optimizer, judged) or "-",
        losses=losses,
        final_loss=sum(losses[-last_k:]) / last_k if losses else None,
        last_k=last_k,
        bytes_per_param=memory.total,
        peak_bytes_per_param=memory.peak,
        seconds_per_step=timer.seconds_per_step,
    )


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``package.Class`` (``torch.AdamW``, ``optimi.AdamW``): the class name alone is ambiguous."""
    cls = type(optimizer)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


class _StepTimer(Callback):
    """Times the optimizer steps after the first."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.start is None:
            self.start = now  # the first step allocates the optimizer state: not timed
        self.end = now

    @property
    def seconds_per_step(self) -> float | None:
        if self.start is None or self.end is None or self.steps < 2:
            return None
        return (self.end - self.start) / (self.steps - 1)


class quiet_lightning:
    """Silence Lightning's per-trainer banners and known CPU-only warnings while recipes run; keeps our warning.

    A context manager: inside ``with quiet_lightning():`` the Lightning and library loggers show warnings and errors
    only, and the known harmless CPU-only warnings are ignored; a :class:`~lightning_precision.PrecisionWarning`
    still shows. Both are restored on exit.
    """

    _NOISE = (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*the number of training batches.*is smaller than the logging interval.*",
        ".*LeafSpec.*is deprecated.*",
    )

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for pattern in self._NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        self._levels = {}
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_precision"):
            log = logging.getLogger(name)
            self._levels[name] = log.level
            log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)
