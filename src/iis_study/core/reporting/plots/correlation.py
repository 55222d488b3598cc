"""IIS (or chance-corrected IIS) against linear-probe accuracy (METHOD §4, §7): :func:`iis_vs_accuracy`
(one panel per concept type, with error bars, the random-init controls, a least-squares line and
the correlation coefficients) and :func:`iis_vs_accuracy_by_scope` (one such figure per scope).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import (
    FIT_COLOR,
    FONT,
    RANDOM_COLOR,
    SMALL,
    as_float,
    fmt,
    fmt_p,
    ordered_unique,
    palette,
    panel_figure,
    require_columns,
)

logger = logging.getLogger("iis_study.core.reporting.plots")

PERFECT_IIS = 0.98  # the trapezoid area under ARR = 1 over the grid (0 ... 0.98), METHOD §4: not a ceiling (ARR > 1 can be)
_SCORE_LABELS = {"iis": "IIS", "iis_chance_corrected": "chance-corrected IIS"}
_COEFFICIENTS = (("pearson", "Pearson r"), ("spearman", "Spearman ρ"), ("kendall", "Kendall τ"))


def iis_vs_accuracy(
    iis_scores: pd.DataFrame,
    correlation: Mapping[str, Any],
    score: str = "iis",
    scope: str | None = None,
    family_order: Sequence[str] | None = None,
) -> Figure:
    """The correlation plot: ``score`` against linear-probe accuracy, one panel per concept type.

    Each backbone is a labelled point with its ±std accuracy error bar (over seeds) and, for
    ``score == "iis"``, its bootstrap interval ``[iis_ci_low, iis_ci_high]`` as the vertical
    error bar. Random-init controls (``weights == "random"``) are drawn with a distinct
    marker. A least-squares line is fitted over all points of a panel (those the
    coefficients are computed over) when there are at least two distinct accuracies. The
    panel title gives Pearson r (with its bootstrap interval), Spearman ρ and Kendall τ with
    p-values from ``correlation[concept_type][score]``; missing or None values read "n/a".

    Args:
        iis_scores: one row per (backbone, concept_type); needs columns backbone,
            concept_type, weights, accuracy_linear_probe and ``score`` (plus
            accuracy_linear_probe_std, iis_ci_low, iis_ci_high if present).
        correlation: ``{concept_type: {score: {"pearson": {"r", "p", "ci_low", "ci_high"},
            "spearman": {...}, "kendall": {...}, "n_backbones": n}}}``.
        score: the score column on the y axis, e.g. "iis" or "iis_chance_corrected".

    Returns:
        The figure (one axes per concept type).
    """
    base = ["backbone", "concept_type", "weights", "accuracy_linear_probe"]
    require_columns(iis_scores, base, "iis_scores")
    if not isinstance(score, str) or score not in iis_scores.columns:
        raise ValueError(f"score must name a column of iis_scores (e.g. 'iis'), got {score!r}")
    if not isinstance(correlation, Mapping):
        raise ValueError(
            "correlation must be a mapping concept_type -> score -> coefficients, "
            f"got {type(correlation).__name__}"
        )
    types = ordered_unique(iis_scores["concept_type"])
    by_family = _has_families(iis_scores)
    fit_pretrained = scope is None and _scope_of(correlation, score) == "pretrained"
    fig, axes = panel_figure(len(types), extra_width=2.2 if by_family else 0.0, extra_height=0.5)
    has_random = bool((iis_scores["weights"].astype(str) == "random").any())
    if by_family:  # one colour per family, the same in every figure of a study
        families = list(family_order) if family_order is not None else ordered_unique(_family_names(iis_scores))
    else:
        families = []
    for i, (ax, ctype) in enumerate(zip(axes, types)):
        group = iis_scores[iis_scores["concept_type"] == ctype]
        if by_family:  # study scale: colour by family, marker by layer, size by resolution; a legend, not labels
            _scatter_families(ax, group, score, families, legend=i == len(types) - 1)
        else:
            _scatter_scores(ax, group, score)
        # the fit over the representations the panel's coefficients are computed over
        fit = group[group["weights"].astype(str) != "random"] if fit_pretrained else group
        _fit_line(ax, fit["accuracy_linear_probe"].to_numpy(float), fit[score].to_numpy(float))
        if score == "iis":
            ax.axhline(PERFECT_IIS, color=FIT_COLOR, linestyle=":", linewidth=0.9)
        title = _correlation_title(ctype, correlation.get(ctype), score, len(group))
        ax.set_title(title, fontsize=SMALL, loc="left")
        ax.set_xlabel("linear-probe accuracy $A_{std}$ (test)")
        ax.set_ylabel(_SCORE_LABELS.get(score, score))
        ax.margins(x=0.15, y=0.12)
    flags = [c for c in ("probe_converged", "heads_converged") if c in iis_scores.columns]
    converged = (iis_scores[flags].astype(bool).all(axis=1) if flags
                 else pd.Series(True, index=iis_scores.index))
    if by_family:  # markers are in the seaborn legend; here the lines and what the error bars mean
        err = "grey bars: ±std acc., bootstrap CI of IIS" if score == "iis" else "grey bars: ±std acc."
        handles = [Line2D([], [], color=FIT_COLOR, linestyle="--",
                          label="least-squares fit" + (", pretrained" if fit_pretrained else "")),
                   Line2D([], [], color="0.75", label=err)]
        if score == "iis":
            handles.append(Line2D([], [], color=FIT_COLOR, linestyle=":", label=f"ARR = 1 at every s ({PERFECT_IIS})"))
    else:
        handles = _score_legend_handles(has_random, score, fit_pretrained)
    if not converged.all():  # a legend entry (not loose text, which the legend would overlap)
        handles.append(Line2D([], [], linestyle="none", marker="$†$", color="0.2",
                              label="not certified / not converged (raise sweep.max_iter or sweep.steps)"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=3,
        fontsize=SMALL,
        frameon=False,
    )
    fig.get_layout_engine().execute(fig)  # final axes positions (legend included): labels in display space
    for ax, ctype in zip(axes, types):
        group = iis_scores[iis_scores["concept_type"] == ctype]
        if by_family and len(group) > _MAX_LABELS:
            continue  # too many points to label without collisions: the legend names them
        # a score from an optimiser that had not converged is marked, never hidden
        labels = [lab if converged[i] else f"{lab} †" for i, lab in zip(group.index, group["backbone"].astype(str))]
        _label_points(ax, group["accuracy_linear_probe"].to_numpy(float), group[score].to_numpy(float), labels)
    label = _SCORE_LABELS.get(score, score)
    if scope is not None:
        what = f"the {scope} scope ({iis_scores['backbone'].nunique()} representations)"
    else:
        what = "representations (coefficients and fit: the pretrained scope)" if by_family else "backbones"
    fig.suptitle(f"{label} vs classifiability across {what}", fontsize=FONT + 1)
    logger.debug("iis_vs_accuracy: %d panels, score %s", len(types), score)
    return fig


_MAX_LABELS = 8  # more points than this in a panel: no per-point labels (they would pile up)


def iis_vs_accuracy_by_scope(
    iis_scores: pd.DataFrame, correlation_scopes: Mapping[str, Any], score: str = "iis"
) -> dict[str, Figure]:
    """One :func:`iis_vs_accuracy` figure per correlation scope (``all``, ``pretrained``,
    ``family_<name>``, ...): the scope's representations, its coefficients, its fit.

    ``iis_scores`` names representations in ``backbone`` (readable names); ``correlation_scopes``
    is ``correlation_scopes.json`` (``groups``: scope, group, representations, correlation).
    """
    figures = {}
    order = ordered_unique(_family_names(iis_scores)) if "family" in iis_scores.columns else None
    for entry in correlation_scopes.get("groups", []):
        members = set(entry.get("representations") or [])
        sub = iis_scores[iis_scores["backbone"].isin(members)]
        if sub.empty:
            continue
        scope, group = str(entry.get("scope")), str(entry.get("group"))
        name = scope if group == scope else f"{scope}_{group}"
        figures[name] = iis_vs_accuracy(sub, entry.get("correlation") or {}, score=score,
                                        scope=name.replace("_", " "), family_order=order)
    return figures


def _scope_of(correlation: Mapping[str, Any], score: str) -> str | None:
    """The scope the coefficients were computed over (``correlation.json`` records it per entry)."""
    for entry in correlation.values() if isinstance(correlation, Mapping) else []:
        stats = entry.get(score) if isinstance(entry, Mapping) else None
        if isinstance(stats, Mapping) and stats.get("scope"):
            return str(stats["scope"])
    return None


def _family_names(scores: pd.DataFrame) -> pd.Series:
    return scores["family"].fillna("none").astype(str)


def _has_families(scores: pd.DataFrame) -> bool:
    """Whether the representations come from families (layers x resolutions of a few backbones)."""
    return "family" in scores.columns and scores["family"].notna().any() and scores["family"].nunique() > 1


def _scatter_families(ax: Axes, group: pd.DataFrame, score: str, families: list[str], legend: bool) -> None:
    """seaborn's scatterplot: hue = family, style = layer, size = input resolution; grey error bars."""
    x = group["accuracy_linear_probe"].to_numpy(float)
    y = group[score].to_numpy(float)
    yerr = None
    if score == "iis" and {"iis_ci_low", "iis_ci_high"} <= set(group.columns):
        yerr = np.stack([np.nan_to_num(y - group["iis_ci_low"].to_numpy(float), nan=0.0).clip(min=0),
                         np.nan_to_num(group["iis_ci_high"].to_numpy(float) - y, nan=0.0).clip(min=0)])
    ax.errorbar(x, y, xerr=_column_or_zero(group, "accuracy_linear_probe_std"), yerr=yerr, fmt="none",
                ecolor="0.75", elinewidth=0.7, capsize=0, zorder=1)
    data = group.assign(family=_family_names(group), layer=group["layer"].fillna("penultimate").astype(str))
    size, sizes = None, None
    if "input_size" in data and data["input_size"].notna().all() and data["input_size"].nunique() > 1:
        # resolutions as categories: "32 px", "96 px"
        px = sorted(int(v) for v in data["input_size"].dropna().unique())
        data = data.assign(resolution=data["input_size"].map(lambda v: f"{int(v)} px" if pd.notna(v) else "?"))
        size, sizes = "resolution", {f"{v} px": 30 + 60 * i / max(len(px) - 1, 1) for i, v in enumerate(px)}
    sns.scatterplot(
        data=data, x="accuracy_linear_probe", y=score, hue="family", hue_order=families,
        palette=palette(families), style="layer", size=size, sizes=sizes,
        size_order=list(sizes) if sizes else None,
        edgecolor="white", linewidth=0.5, zorder=3, ax=ax, legend="brief" if legend else False,
    )
    if legend:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=SMALL,
                        title=None)
    ax.set_xlabel("")
    ax.set_ylabel("")


def _scatter_scores(ax: Axes, group: pd.DataFrame, score: str) -> None:
    """Points with error bars and backbone labels; random-init controls get their own marker."""
    x = group["accuracy_linear_probe"].to_numpy(float)
    y = group[score].to_numpy(float)
    xerr = _column_or_zero(group, "accuracy_linear_probe_std")
    yerr = None
    if score == "iis" and {"iis_ci_low", "iis_ci_high"} <= set(group.columns):
        low = np.nan_to_num(y - group["iis_ci_low"].to_numpy(float), nan=0.0).clip(min=0)
        high = np.nan_to_num(group["iis_ci_high"].to_numpy(float) - y, nan=0.0).clip(min=0)
        yerr = np.stack([low, high])
    is_random = (group["weights"].astype(str) == "random").to_numpy()
    for mask, marker, color, size in ((~is_random, "o", "C0", 6), (is_random, "X", RANDOM_COLOR, 8)):
        if not mask.any():
            continue
        ax.errorbar(
            x[mask],
            y[mask],
            xerr=xerr[mask],
            yerr=None if yerr is None else yerr[:, mask],
            fmt=marker,
            color=color,
            markersize=size,
            markeredgecolor="white",
            markeredgewidth=0.6,
            ecolor=color,
            elinewidth=0.9,
            capsize=2,
            zorder=3,
        )


# Candidate label offsets (points) and alignments around a point, in order of preference.
_LABEL_SPOTS = (
    ((5, 3), "left", "bottom"),
    ((5, -3), "left", "top"),
    ((-5, 3), "right", "bottom"),
    ((-5, -3), "right", "top"),
    ((0, 7), "center", "bottom"),
    ((0, -7), "center", "top"),
)


def _label_points(ax: Axes, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> None:
    """Annotate each finite point with its name, greedily picking the spot that overlaps least.

    Label boxes are estimated from the font size (0.6 em per character); obstacles are the
    markers, the labels placed so far and the axes border.
    """
    fontsize = SMALL - 0.5
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return
    pts = ax.transData.transform(np.column_stack([x, y])) * 72.0 / ax.figure.dpi  # points
    frame = ax.get_window_extent()
    x0, y0, x1, y1 = (np.array([frame.x0, frame.y0, frame.x1, frame.y1]) * 72.0 / ax.figure.dpi).tolist()
    obstacles = [(px - 4, py - 4, px + 4, py + 4) for (px, py), good in zip(pts, ok) if good]
    for i in np.argsort(-np.where(ok, y, -np.inf)):
        if not ok[i]:
            continue
        w, h = 0.6 * fontsize * len(names[i]), fontsize
        best, best_cost = _LABEL_SPOTS[0], math.inf
        for spot in _LABEL_SPOTS:
            box = _label_box(pts[i], spot, w, h)
            cost = sum(_overlap(box, ob) for ob in obstacles) + 3 * (w * h - _overlap(box, (x0, y0, x1, y1)))
            if cost < best_cost - 1e-9:
                best, best_cost = spot, cost
        obstacles.append(_label_box(pts[i], best, w, h))
        (dx, dy), ha, va = best
        ax.annotate(names[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                    fontsize=fontsize, color="#333333",
                    bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "alpha": 0.7, "linewidth": 0})


def _label_box(
    p: np.ndarray, spot: tuple[tuple[int, int], str, str], w: float, h: float
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in points of a label of size ``w × h`` at ``spot`` around ``p``."""
    (dx, dy), ha, va = spot
    left = p[0] + dx - {"left": 0.0, "center": w / 2, "right": w}[ha]
    bottom = p[1] + dy - (h if va == "top" else 0.0)
    return left, bottom, left + w, bottom + h


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection area of two (x0, y0, x1, y1) boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _column_or_zero(df: pd.DataFrame, column: str) -> np.ndarray:
    """A float column with NaN as 0, or zeros when the column is absent."""
    if column not in df.columns:
        return np.zeros(len(df))
    return np.nan_to_num(df[column].to_numpy(float), nan=0.0)


def _fit_line(ax: Axes, x: np.ndarray, y: np.ndarray) -> None:
    """Least-squares line over the finite points; skipped with < 2 distinct x values."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or np.ptp(x) == 0:
        return
    slope, intercept = np.polyfit(x, y, 1)
    pad = 0.05 * np.ptp(x)
    xs = np.array([x.min() - pad, x.max() + pad])
    ax.plot(
        xs, slope * xs + intercept, color=FIT_COLOR, linestyle="--", linewidth=1.0, zorder=2, label="_fit"
    )


def _correlation_title(ctype: str, entry: Any, score: str, n_rows: int) -> str:
    """Concept type, n, and the three coefficients with p-values ("n/a" where missing)."""
    stats = entry.get(score) if isinstance(entry, Mapping) else None
    stats = stats if isinstance(stats, Mapping) else {}
    n = stats.get("n_backbones")
    n_txt = str(int(n)) if math.isfinite(as_float(n)) else str(n_rows)
    lines = [f"{ctype} concepts (n = {n_txt} backbones)"]
    for key, label in _COEFFICIENTS:
        coef = stats.get(key)
        coef = coef if isinstance(coef, Mapping) else {}
        text = f"{label} = {fmt(coef.get('r'))}"
        low, high = as_float(coef.get("ci_low")), as_float(coef.get("ci_high"))
        if math.isfinite(low) and math.isfinite(high):
            text += f" [{low:.2f}, {high:.2f}]"
        lines.append(f"{text}, p = {fmt_p(coef.get('p'))}")
    return "\n".join(lines)


def _score_legend_handles(has_random: bool, score: str, fit_pretrained: bool = False) -> list[Any]:
    """Legend entries for the marker kinds, the fit and the reference line."""
    err = "±std acc., bootstrap CI of IIS" if score == "iis" else "±std acc."
    handles: list[Any] = [
        Line2D([], [], marker="o", color="C0", linestyle="none", markersize=6, label=f"pre-trained ({err})")
    ]
    if has_random:
        handles.append(
            Line2D(
                [],
                [],
                marker="X",
                color=RANDOM_COLOR,
                linestyle="none",
                markersize=8,
                label="random-init control",
            )
        )
    handles.append(Line2D([], [], color=FIT_COLOR, linestyle="--",
                          label="least-squares fit" + (", pretrained" if fit_pretrained else "")))
    if score == "iis":
        handles.append(Line2D([], [], color=FIT_COLOR, linestyle=":", label=f"ARR = 1 at every s ({PERFECT_IIS})"))
    return handles

