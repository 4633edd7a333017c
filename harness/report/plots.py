"""Figures of the report, written as PNG files (matplotlib, Agg backend: no display needed).

Each function draws one figure, saves it to ``path`` and closes it, so a study with many metrics never
accumulates open figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness.report.effects import pair_key  # noqa: E402
from harness.report.tables import pareto_front  # noqa: E402

__all__ = [
    "effects_bars",
    "interaction_heatmap",
    "optuna_figure",
    "pareto_plot",
]

_DPI = 110
_FAMILY_COLOURS = {"base": "#555555", "baseline": "#1f77b4", "unisd": "#d62728"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def interaction_heatmap(effects: dict, components: Sequence[str], metric: str, path: Path) -> Path:
    """Symmetric matrix of pair interactions (diagonal: main effects); grey cells are not identifiable."""
    n = len(components)
    grid = np.full((n, n), np.nan)
    for i, a in enumerate(components):
        value = effects["main_effects"][a]
        grid[i, i] = np.nan if value is None else value
        for j in range(i + 1, n):
            value = effects["interactions"][pair_key(a, components[j])]
            grid[i, j] = grid[j, i] = np.nan if value is None else value
    off = grid[~np.eye(n, dtype=bool)]
    limit = float(np.nanmax(np.abs(off))) if np.isfinite(off).any() else 1.0
    limit = limit or 1.0
    size = 1.2 + 0.9 * n
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    masked = np.ma.masked_invalid(np.where(np.eye(n, dtype=bool), np.nan, grid))
    image = ax.imshow(masked, cmap=cmap, vmin=-limit, vmax=limit)
    for i in range(n):
        for j in range(n):
            text = "n/a" if not np.isfinite(grid[i, j]) else f"{grid[i, j]:+.3g}"
            if i == j:
                text = "main\n" + text
            # white on the saturated ends of the colormap, where black text was unreadable in the browser
            strong = i != j and np.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if strong else "black")
    ax.set_xticks(range(n), components, rotation=35, ha="right")
    ax.set_yticks(range(n), components)
    ax.set_title(
        f"Pair interactions on {metric}\n(effect of row with column on − off; diagonal: main effect)",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="interaction")
    return _save(fig, path)


def effects_bars(effects: dict, components: Sequence[str], metric: str, path: Path) -> Path:
    """Shapley values next to main effects; a missing bar is a quantity that is not identifiable."""
    shapley = [effects["shapley"][c] for c in components]
    main = [effects["main_effects"][c] for c in components]
    x = np.arange(len(components))
    fig = Figure(figsize=(1.6 + 1.0 * len(components), 3.6))
    ax = fig.add_subplot()
    width = 0.38
    for offset, values, label, colour in (
        (-width / 2, shapley, "Shapley value", "#d62728"),
        (width / 2, main, "main effect", "#1f77b4"),
    ):
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + offset, heights, width, label=label, color=colour)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:+.3g}" for v in values], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, components, rotation=25, ha="right")
    ax.set_ylabel(f"Δ {metric}")
    ax.set_title(f"Component contributions to {metric}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_plot(points: pd.DataFrame, x: str, y: str, path: Path) -> Path:
    """Variants as points (seed-means) of ``y`` (higher better) against ``x`` (lower better); the front
    of non-dominated variants is drawn as a step line."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    xs, ys = points[x].to_numpy(dtype=float), points[y].to_numpy(dtype=float)
    for family, colour in _FAMILY_COLOURS.items():
        sel = (points["family"] == family).to_numpy()
        if sel.any():
            ax.scatter(xs[sel], ys[sel], color=colour, label=family, zorder=3)
    other = ~points["family"].isin(list(_FAMILY_COLOURS)).to_numpy()
    if other.any():
        ax.scatter(xs[other], ys[other], color="#2ca02c", label="other", zorder=3)
    front = pareto_front(xs, ys)
    order = np.argsort(xs[front])
    ax.step(
        xs[front][order], ys[front][order], where="post", color="black", linewidth=1, label="Pareto front"
    )
    for name, px, py, on in zip(points["variant"], xs, ys, front, strict=True):
        ax.annotate(
            str(name),
            (px, py),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
            fontweight="bold" if on else "normal",
        )
    ax.margins(x=0.2, y=0.1)  # room for the variant labels
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title(f"{y} against {x}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def optuna_figure(draw: Callable[..., object], path: Path, **kwargs) -> Path:
    """Save one of ``optuna.visualization.matplotlib``'s plots (they draw on pyplot and return Axes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        result = draw(**kwargs)
    axes = np.atleast_1d(np.asarray(result, dtype=object)).ravel()
    fig = axes[0].figure
    try:
        fig.set_size_inches(max(fig.get_size_inches()[0], 9.0), max(fig.get_size_inches()[1], 4.8))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI)
    finally:
        plt.close(fig)
    return path
