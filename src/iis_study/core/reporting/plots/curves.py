"""ARR(s) (or A(s)) against the sparsity ratio (METHOD §4): :func:`sparsity_curves`, one line per
backbone (mean over seeds, ±std band), one panel per concept type."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .style import FIT_COLOR, FONT, SMALL, ordered_unique, palette, panel_figure, require_columns

_VALUE_LABELS = {
    "arr": "accuracy retention ratio ARR(s)",
    "arr_chance_corrected": "chance-corrected ARR(s)",
    "accuracy": "accuracy A(s)",
}


def sparsity_curves(curves: pd.DataFrame, value: str = "arr") -> Figure:
    """ARR(s) (or A(s)) against the sparsity ratio s, one panel per concept type.

    One line per backbone: the mean over seeds at each sparsity, with a ±std band (no band
    with a single seed). The y axis starts at 0 (lower if a chance-corrected value is
    negative); for ARR values the perfect-retention line y = 1 is dashed. X ticks sit at
    the sparsity grid values. Backbone colours are the same in every panel.

    Args:
        curves: long table with columns backbone, concept_type, seed, sparsity and ``value``.
        value: the column on the y axis: "arr", "arr_chance_corrected" or "accuracy".

    Returns:
        The figure (one axes per concept type).
    """
    if value not in _VALUE_LABELS:
        raise ValueError(f"value must be one of {sorted(_VALUE_LABELS)}, got {value!r}")
    require_columns(curves, ["backbone", "concept_type", "seed", "sparsity", value], "curves")
    types = ordered_unique(curves["concept_type"])
    backbones = ordered_unique(curves["backbone"])
    colors = palette(backbones)
    grid = np.sort(pd.unique(curves["sparsity"].astype(float)))
    stats = (
        curves.assign(sparsity=curves["sparsity"].astype(float))
        .groupby(["concept_type", "backbone", "sparsity"], sort=False)[value]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    fig, axes = panel_figure(len(types), extra_width=1.6)
    y_min = min(0.0, float(np.nanmin(stats["mean"] - stats["std"].fillna(0))))
    y_top = float(np.nanmax(stats["mean"] + stats["std"].fillna(0))) * 1.03
    y_max = max(1.05 if value != "accuracy" else 0.0, y_top)
    for ax, ctype in zip(axes, types):
        data = curves[curves["concept_type"] == ctype].assign(sparsity=lambda d: d["sparsity"].astype(float))
        data = data.dropna(subset=["sparsity", value])  # seaborn skips an all-NaN level: labels would shift
        order = [b for b in backbones if b in set(data["backbone"])]
        several_seeds = data["seed"].nunique() > 1
        before = len(ax.lines)
        # seaborn's own mean line and ±std band over seeds (no band with a single seed)
        sns.lineplot(
            data=data, x="sparsity", y=value, hue="backbone", hue_order=order, palette=colors, estimator="mean",
            errorbar="sd" if several_seeds else None, marker="o", markersize=4, markeredgewidth=0,
            linewidth=1.4, err_kws={"alpha": 0.2, "linewidth": 0}, legend=False, zorder=3, ax=ax,
        )
        for line, backbone in zip(ax.lines[before:], order):  # seaborn draws one line per hue level, in order
            line.set_label(str(backbone))
        if value != "accuracy":
            ax.axhline(1.0, color=FIT_COLOR, linestyle="--", linewidth=1.0, zorder=1)
        _sparsity_ticks(ax, grid)
        ax.set_ylim(y_min, y_max)
        ax.set_xlim(grid.min() - 0.02, grid.max() + 0.02)
        ax.set_title(f"{ctype} concepts", fontsize=FONT)
        ax.set_xlabel("sparsity ratio s (fraction of concepts removed)")
        ax.set_ylabel(_VALUE_LABELS[value])
    handles = [Line2D([], [], color=colors[b], marker="o", markersize=4, label=str(b)) for b in backbones]
    if value != "accuracy":
        handles.append(Line2D([], [], color=FIT_COLOR, linestyle="--", label="perfect retention"))
    handles.append(Patch(color="#999999", alpha=0.3, label="±std over seeds"))
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=SMALL,
        title="backbone",
        title_fontsize=SMALL,
        frameon=False,
    )
    fig.suptitle(f"{_VALUE_LABELS[value]} vs sparsity (mean over seeds)", fontsize=FONT + 1)
    return fig


def _sparsity_ticks(ax: Axes, grid: np.ndarray) -> None:
    """Ticks at every grid value; labels vertical so crowded values (0.9, 0.95, 0.98) stay legible."""
    ax.set_xticks(grid)
    ax.set_xticklabels([f"{s:g}" for s in grid], rotation=90)
    ax.grid(True, axis="x", color="#f0f0f0", linewidth=0.6)
