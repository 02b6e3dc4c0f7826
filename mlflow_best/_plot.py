"""The run's picture: the monitored metric per epoch, improvements marked, saved as a small PNG.

Drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``: no global figure
state, no GUI backend picked up from the user's environment, and safe to call from any thread or a
headless server.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class EpochPoint(NamedTuple):
    """One epoch as the plot sees it: the monitored value and whether it was a new best."""

    epoch: int
    value: float
    improved: bool


def plot_filename(monitor: str) -> str:
    """``val_loss.png``; a metric name such as ``val/loss`` becomes ``val_loss.png``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", monitor).strip("._")
    return f"{stem or 'metric'}.png"


def render_metric_plot(
    path: str | os.PathLike[str],
    points: Sequence[EpochPoint],
    monitor: str,
    mode: str,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``monitor`` per epoch with every improvement marked and the best one labelled.

    Args:
        path: the PNG file to write (its folder is created); written atomically.
        points: the epochs in order; non-finite values leave a gap instead of breaking the axis.
        monitor: the metric name, for the axis label.
        mode: "min" or "max", for the legend ("lower is better").
        title: the figure title (default: the metric name).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [p.epoch for p in points]
    values = [p.value if math.isfinite(p.value) else math.nan for p in points]
    ax.plot(epochs, values, color="#4a6fa5", linewidth=1.6, marker="o", markersize=3, label=monitor)
    better = [p for p in points if p.improved and math.isfinite(p.value)]
    if better:
        ax.scatter(
            [p.epoch for p in better],
            [p.value for p in better],
            s=46,
            facecolors="none",
            edgecolors="#2e8b57",
            linewidths=1.6,
            zorder=3,
            label="improved (checkpoint)",
        )
        best = better[-1]
        ax.scatter([best.epoch], [best.value], s=140, marker="*", color="#d4a017", zorder=4,
                   label=f"best: {best.value:.4g} at epoch {best.epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor)
    direction = "lower" if mode == "min" else "higher"
    ax.set_title(title or f"{monitor} per epoch ({direction} is better)", fontsize=11)
    ax.grid(True, alpha=0.3)
    if epochs and max(epochs) - min(epochs) < 12:
        ax.set_xticks(range(min(epochs), max(epochs) + 1))
    ax.legend(fontsize=8, loc="best")
    # Written next to the target and renamed: a reader (the uploader, a sync) never sees half a PNG.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
