"""The shared style of the study's figures: figure and panel layout, fonts, palette, number formats
and input checks (:mod:`iis_study.core.reporting.plots`).

Figures are built with the object-oriented API on an Agg canvas (no ``pyplot``, so no global
figure registry and no global ``rcParams`` change); all sizes are in inches and points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 150
FONT = 9.0
SMALL = 7.5
PANEL_W, PANEL_H = 4.2, 3.4
RANDOM_COLOR = "#7f7f7f"
FIT_COLOR = "#404040"


# --------------------------------------------------------------------------- helpers


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on an Agg canvas, sized in inches."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax: Axes) -> None:
    """Light grid behind the data, no top/right spines, explicit font sizes."""
    ax.set_axisbelow(True)
    ax.grid(True, color="#e3e3e3", linewidth=0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=SMALL)
    ax.xaxis.label.set_size(FONT)
    ax.yaxis.label.set_size(FONT)


def require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise a ValueError naming ``name`` if ``df`` lacks any of ``columns``."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}; expected at least {list(columns)}")
    if df.empty:
        raise ValueError(f"{name} must have at least one row")


def ordered_unique(values: pd.Series) -> list[Any]:
    """Unique values in order of first appearance."""
    return list(pd.unique(values))


def _panel_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for ``n`` panels, at most 3 columns."""
    ncols = n if n <= 3 else (2 if n == 4 else 3)
    return math.ceil(n / ncols), ncols


def panel_figure(n: int, extra_width: float = 0.0, extra_height: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` styled panels (unused grid cells left empty) plus room for an outside legend."""
    nrows, ncols = _panel_shape(n)
    fig = new_figure(PANEL_W * ncols + extra_width, PANEL_H * nrows + extra_height)
    grid = fig.add_gridspec(nrows, ncols)
    axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n)]
    for ax in axes:
        style_axes(ax)
    return fig, axes


def palette(names: Sequence[Any]) -> dict[Any, tuple[float, float, float]]:
    """One colour-blind-safe colour per name, stable across panels."""
    n = len(names)
    colors = sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)
    return dict(zip(names, colors))


def as_float(value: Any) -> float:
    """``value`` as a float; None and non-numbers become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or "n/a" for None/NaN."""
    v = as_float(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value: 3 decimals, scientific notation below 0.001, "n/a" for None/NaN."""
    v = as_float(value)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"
