"""The specification curve (:mod:`iis_study.core.scoring.specification`): :func:`specification_curve`, Pearson r of
accuracy with the score under every specification, sorted, one panel per (concept type, scope)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .style import FONT, SMALL, new_figure, require_columns, style_axes


def specification_curve(curve: pd.DataFrame, record: dict[str, Any]) -> Figure:
    """Pearson r of every specification, sorted, coloured by the score and marked by the probe's inputs;
    the headline specification ringed; the verdict in each panel's title. One row of panels per concept type,
    one column per scope."""
    require_columns(curve, ["concept_type", "scope", "score", "probe_inputs", "pearson_r", "headline"], "curve")
    types, scopes = list(pd.unique(curve["concept_type"])), list(pd.unique(curve["scope"]))
    verdicts = {(r["concept_type"], r["scope"]): r for r in record.get("verdicts", [])}
    fig = new_figure(3.6 * len(scopes), 2.9 * len(types) + 0.4)
    axes = fig.subplots(len(types), len(scopes), squeeze=False, sharey=True)
    for i, ctype in enumerate(types):
        for j, scope in enumerate(scopes):
            ax = axes[i][j]
            part = curve[(curve["concept_type"] == ctype) & (curve["scope"] == scope)].dropna(subset=["pearson_r"])
            part = part.sort_values("pearson_r").reset_index(drop=True).assign(rank=lambda d: d.index + 1)
            if len(part):
                sns.scatterplot(data=part, x="rank", y="pearson_r", hue="score", style="probe_inputs", s=16,
                                ax=ax, legend=(i == 0 and j == len(scopes) - 1), linewidth=0)
                head = part[part["headline"].astype(bool)]
                ax.scatter(head["rank"], head["pearson_r"], s=80, facecolors="none", edgecolors="black", linewidths=1.0)
            ax.axhline(0.0, color="black", linewidth=0.8)
            rec = verdicts.get((ctype, scope), {})
            n_pos, n_neg, n = rec.get("n_positive", 0), rec.get("n_negative", 0), rec.get("n_specifications", 0)
            word = "robust" if rec.get("robust") else "not identified"
            ax.set_title(f"{ctype}, {scope} (n = {rec.get('n_representations', 0)})\n"
                         f"sign {word}: {n_pos}+ / {n_neg}- of {n}", fontsize=FONT)
            ax.set_xlabel("specification (sorted by r)", fontsize=SMALL)
            ax.set_ylabel("Pearson r (accuracy, score)", fontsize=SMALL)
            ax.set_ylim(-1.05, 1.05)
            style_axes(ax)
    for ax in fig.axes:
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=SMALL,
                            title_fontsize=SMALL)
    return fig
