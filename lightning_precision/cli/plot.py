"""The loss-curve plot of ``lightning-precision compare``.

matplotlib is an optional dependency (the ``plot`` extra): it is imported only when a plot is drawn, so the package,
its plugins and the ``compare`` table work without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: compare imports this module
    from lightning_precision.cli.compare import RecipeResult

PLOT_EXTRA_INSTALL = 'pip install "lightning_precision[plot]"'
"""The command that installs what the plot needs."""

_LINESTYLES = ("-", "--", "-.", (0, (1, 1)))


class PlotUnavailableError(ImportError):
    """matplotlib cannot be imported, so no plot is drawn; the message says how to install it."""


def plot_losses(results: Sequence[RecipeResult], path: Path, reference: float | None) -> Path | None:
    """Plot every recipe's loss curve (log scale, smoothed) to a PNG.

    Args:
        results: The recipes' results; those without losses are left out.
        path: Where the PNG is written.
        reference: The fp32 reference's final loss, drawn as a horizontal line (``None``: not drawn).

    Returns:
        ``path``, or ``None`` if no recipe has losses.

    Raises:
        PlotUnavailableError: If matplotlib is not installed.
    """
    curves = [r for r in results if r.losses]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(curves):
        ax.plot(  # safe recipes overlap the reference: distinct dashes keep every curve visible
            moving_average(r.losses),
            label=f"{r.recipe.name} ({r.optimizer}, state {r.state_dtype})",
            linewidth=1.5,
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
        )
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1, label=f"fp32 final loss {reference:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("Built-in task: same data, same seed, different precision recipes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    """``matplotlib.pyplot`` with a file-only backend; imported here, so nothing else needs matplotlib."""
    try:
        import matplotlib
    except ImportError as err:
        message = f"No loss plot: matplotlib is not installed; {PLOT_EXTRA_INSTALL} to get it."
        raise PlotUnavailableError(message) from err
    matplotlib.use("Agg")  # no display needed: this runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def moving_average(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average, so recipes' curves can be told apart through the step-to-step noise.

    Args:
        values: The series (e.g. per-step losses).
        window: Points averaged; default ``len(values) // 50`` (at least 1). The first points average what there is.

    Returns:
        One averaged value per input value.
    """
    window = window or max(1, len(values) // 50)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
