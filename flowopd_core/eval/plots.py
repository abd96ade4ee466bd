"""Training curves a person can look at: metric histories as PNG line plots (matplotlib's Agg canvas, without
pyplot: the host process's backend, ComfyUI's included, is left as it is)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One panel per key of ``history`` (a list of per-epoch metric dicts); NaN points are skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    cols = min(3, max(1, len(keys)))
    rows = math.ceil(len(keys) / cols)
    figure = Figure(figsize=(4 * cols, 2.8 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(i + 1, h[key]) for i, h in enumerate(history) if key in h and math.isfinite(h[key])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path
