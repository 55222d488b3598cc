"""Fine-tuning curves (METHOD §6, §7): test accuracy and IIS over fine-tuning epochs for each λ
(:func:`fine_tuning_curves`; λ = 0 is the cross-entropy-only control)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .style import FONT, PANEL_H, PANEL_W, SMALL, new_figure, ordered_unique, require_columns, style_axes


def fine_tuning_curves(df: pd.DataFrame) -> Figure:
    """Test accuracy and IIS over fine-tuning epochs, one colour per λ (METHOD §6, §7).

    Two panels per backbone (one panel row each): test accuracy vs epoch and IIS vs epoch.
    Each λ is one line, the mean over seeds, with a band spanning the seeds' min–max. λ = 0
    (cross-entropy only) is labelled "λ = 0 (control)" and drawn in grey. Epochs where the
    IIS was not scored (NaN) are skipped in the IIS panel.

    Args:
        df: columns backbone, lam, seed, epoch, accuracy_test, iis.

    Returns:
        The figure (``2 × n_backbones`` axes).
    """
    require_columns(df, ["backbone", "lam", "seed", "epoch", "accuracy_test", "iis"], "df")
    backbones = ordered_unique(df["backbone"])
    lams = sorted(pd.unique(df["lam"].astype(float)))
    colors = _lambda_colors(lams)
    nrows = len(backbones)
    fig = new_figure(2 * PANEL_W + 1.7, PANEL_H * nrows + 0.3)
    grid = fig.add_gridspec(nrows, 2)
    panels = (("accuracy_test", "test accuracy"), ("iis", "IIS"))
    for r, backbone in enumerate(backbones):
        sub = df[df["backbone"] == backbone]
        for c, (column, label) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            style_axes(ax)
            _lambda_lines(ax, sub, column, lams, colors)
            n_seeds = sub["seed"].nunique()
            ax.set_title(f"{backbone}: {label}", fontsize=FONT)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{label} (mean of {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    handles: list[Any] = [
        Line2D([], [], color=colors[lam], marker="o", markersize=4, label=_lambda_label(lam)) for lam in lams
    ]
    handles.append(Patch(color="#999999", alpha=0.3, label="min–max over seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=SMALL, frameon=False,
               title="interpretability weight", title_fontsize=SMALL)
    fig.suptitle("Fine-tuning with interpretability maximisation vs the λ = 0 control", fontsize=FONT + 1)
    return fig


def _lambda_label(lam: float) -> str:
    """ "λ = 0 (control)" for 0, else "λ = <value>"."""
    return "λ = 0 (control)" if lam == 0 else f"λ = {lam:g}"


def _lambda_colors(lams: Sequence[float]) -> dict[float, Any]:
    """Grey for the λ = 0 control, palette colours for the others."""
    others = [lam for lam in lams if lam != 0]
    colors: dict[float, Any] = dict(zip(others, sns.color_palette("colorblind", max(len(others), 1))))
    if 0 in lams:
        colors[0.0] = "#555555"
    return colors


def _lambda_lines(
    ax: Axes, sub: pd.DataFrame, column: str, lams: Sequence[float], colors: Mapping[float, Any]
) -> None:
    """Per λ: mean over seeds vs epoch and the min–max band; NaN rows are skipped."""
    valid = sub[np.isfinite(sub[column].to_numpy(float))]
    if valid.empty:
        ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes, fontsize=FONT,
                color="#666666")
        return
    data = valid.assign(lam=valid["lam"].astype(float))
    for lam in lams:  # one call per λ keeps the λ = 0 control's grey; the band is seaborn's min-max interval
        line = data[data["lam"] == lam]
        if line.empty:
            continue
        sns.lineplot(data=line, x="epoch", y=column, ax=ax, estimator="mean", errorbar=("pi", 100),
                     color=colors[lam], marker="o", markersize=3, markeredgewidth=0, linewidth=1.4,
                     err_kws={"alpha": 0.2, "linewidth": 0}, label=_lambda_label(lam), legend=False)
    ax.xaxis.get_major_locator().set_params(integer=True)
