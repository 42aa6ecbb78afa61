"""Figures (reliability diagram) built without pyplot's global state.

Figures are ``matplotlib.figure.Figure`` objects with an Agg canvas attached, so they work
headless, in threads and in DataLoader workers, and never accumulate in pyplot's figure
registry. Log them with ``wandb.Image(fig)`` / ``figure_to_rgb_array(fig)`` and write them
with :func:`save_figure`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["reliability_diagram", "save_figure", "figure_to_rgb_array"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _scalar(bins: Mapping[str, Any], key: str) -> float:
    if key not in bins:
        return math.nan
    return float(_np(bins[key]).reshape(-1)[0])


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.4f}"


def reliability_diagram(bins: Mapping[str, Any], title: str | None = None) -> Figure:
    """Reliability diagram from the dict returned by ``ReliabilityBins.compute()``.

    Top axes: accuracy per confidence bin (bars) against the diagonal, with the gap to the
    bin's mean confidence shaded; ECE and MCE in the legend. Bottom axes: number of
    predictions per bin. Empty bins are not drawn. The torchmetrics "confidence == 1" bin
    (the extra last entry, present when ``len(count) == len(edges)``) is drawn as a marker
    at confidence 1 and a thin count bar.

    Args:
        bins: mapping with ``count``, ``confidence``, ``accuracy`` (per-bin arrays/tensors),
            optionally ``edges`` (``n_bins + 1`` values; default equal-width on [0, 1],
            assuming the extra bin is present), ``ece`` and ``mce``.
        title: optional figure title.

    Returns:
        A ``matplotlib.figure.Figure`` with two axes (no pyplot involved).
    """
    count = _np(bins["count"])
    acc = _np(bins["accuracy"])
    conf = _np(bins["confidence"])
    if "edges" in bins:
        edges = _np(bins["edges"])
    else:
        edges = np.linspace(0.0, 1.0, len(count))  # count has n_bins + 1 entries
    n = len(edges) - 1
    if n < 1 or len(count) not in (n, n + 1) or len(acc) != len(count) or len(conf) != len(count):
        raise ValueError(
            f"inconsistent bins: {len(edges)} edges, {len(count)} counts, {len(acc)} accuracies, "
            f"{len(conf)} confidences"
        )
    ece, mce = _scalar(bins, "ece"), _scalar(bins, "mce")

    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})

    lefts, widths = edges[:-1], np.diff(edges)
    main = np.arange(n)
    filled = main[(count[:n] > 0) & np.isfinite(acc[:n]) & np.isfinite(conf[:n])]

    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    ax.bar(
        lefts[filled], acc[filled], width=widths[filled], align="edge",
        color="tab:blue", edgecolor="navy", linewidth=0.6, label="accuracy",
    )
    ax.bar(
        lefts[filled], conf[filled] - acc[filled], bottom=acc[filled], width=widths[filled], align="edge",
        color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to confidence",
    )
    if len(count) == n + 1 and count[n] > 0 and math.isfinite(acc[n]):
        ax.plot(
            [1.0], [acc[n]], marker="D", linestyle="none", color="tab:purple",
            label=f"confidence = 1 ({int(count[n])})",
        )
    ax.plot([], [], linestyle="none", label=f"ECE = {_fmt(ece)}")
    ax.plot([], [], linestyle="none", label=f"MCE = {_fmt(mce)}")
    ax.set_xlim(0.0, 1.0 + (0.02 if len(count) == n + 1 else 0.0))
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small", handlelength=1.2)
    ax.set_title(title if title is not None else f"Reliability (ECE {_fmt(ece)})")

    ax_hist.bar(lefts[filled], count[filled], width=widths[filled], align="edge", color="0.4")
    if len(count) == n + 1 and count[n] > 0:
        ax_hist.bar([1.0], [count[n]], width=0.01, color="tab:purple")
    nonzero = count[count > 0]
    if nonzero.size and nonzero.max() / nonzero.min() > 100:
        ax_hist.set_yscale("log")
    ax_hist.set_xlabel("confidence (top label)")
    ax_hist.set_ylabel("count")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def figure_to_rgb_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an ``[H, W, 3]`` uint8 array (for image loggers)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
