"""Each representation's IIS beside its null concept sets (docs/calibration.md): :func:`iis_with_nulls`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .style import FONT, SMALL, ordered_unique, panel_figure, require_columns

_NULL_LABELS = {
    "random": "null: random directions",
    "rotated": "null: rotated within span",
    "gaussian": "null: Gaussian like elements",
}


def iis_with_nulls(iis_scores: pd.DataFrame, score: str = "iis", label: str = "IIS") -> Figure:
    """One panel per concept type: per representation, the score over concept draws (with its two-level
    interval) and the score of each null concept set (``<score>_null_<kind>``, with the excess's interval
    around it read as score - excess bounds), side by side. ``score="anec_avg"``: the weight-sparsity
    accuracy (ANEC-avg) of the concepts beside its nulls' (no interval: points only)."""
    require_columns(iis_scores, ["concept_type", score], "iis_scores")
    name = "representation" if "representation" in iis_scores else "backbone"
    kinds = [k for k in _NULL_LABELS if f"{score}_null_{k}" in iis_scores and iis_scores[f"{score}_null_{k}"].notna().any()]
    rows = []
    for r in iis_scores.itertuples(index=False):
        rec = r._asdict()
        rows.append({"concept_type": rec["concept_type"], "representation": str(rec[name]), "what": "concepts",
                     "value": rec[score], "lo": rec.get(f"{score}_ci_low", np.nan),
                     "hi": rec.get(f"{score}_ci_high", np.nan)})
        for k in kinds:
            null = rec[f"{score}_null_{k}"]
            # the null's interval drawn as the excess interval moved onto the null: score - [excess bounds]
            lo = rec[score] - rec.get(f"{score}_excess_{k}_ci_high", np.nan)
            hi = rec[score] - rec.get(f"{score}_excess_{k}_ci_low", np.nan)
            rows.append({"concept_type": rec["concept_type"], "representation": str(rec[name]),
                         "what": _NULL_LABELS[k], "value": null, "lo": lo, "hi": hi})
    data = pd.DataFrame(rows)
    types = ordered_unique(data["concept_type"])
    whats = ["concepts"] + [_NULL_LABELS[k] for k in kinds]
    colors = dict(zip(whats, sns.color_palette("deep", len(whats)), strict=True))
    fig, axes = panel_figure(len(types), extra_width=2.2, extra_height=0.6)
    width = 0.8 / len(whats)
    for ax, ctype in zip(axes, types, strict=False):
        part = data[data["concept_type"] == ctype]
        reps = ordered_unique(part["representation"])
        x0 = {rep: i for i, rep in enumerate(reps)}
        for j, what in enumerate(whats):
            w = part[part["what"] == what]
            x = np.array([x0[rep] for rep in w["representation"]]) + (j - (len(whats) - 1) / 2) * width
            y = w["value"].to_numpy(dtype=float)
            err = np.vstack([y - w["lo"].to_numpy(dtype=float), w["hi"].to_numpy(dtype=float) - y])
            ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0.0).clip(min=0.0), fmt="o" if what == "concepts" else "s",
                        color=colors[what], ms=5, capsize=2, lw=1, label=what)
        ax.set_xticks(range(len(reps)))
        ax.set_xticklabels(reps, rotation=45, ha="right", fontsize=SMALL)
        ax.set_ylabel(label, fontsize=FONT)
        ax.set_title(f"{ctype} concepts and their nulls", fontsize=FONT)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(whats), fontsize=SMALL,
               frameon=False)
    return fig
