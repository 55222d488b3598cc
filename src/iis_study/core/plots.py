"""The study's figures (METHOD §4, §6, §7).

* :func:`iis_vs_accuracy` -- IIS (or chance-corrected IIS) against linear-probe accuracy,
  one panel per concept type, with error bars, the random-init controls, a least-squares
  line and the correlation coefficients.
* :func:`sparsity_curves` -- ARR(s) (or A(s)) against the sparsity ratio, one line per
  backbone (mean over seeds, ±std band), one panel per concept type.
* :func:`concept_gallery` -- test images next to the concept images that drove their
  predictions.
* :func:`fine_tuning_curves` -- test accuracy and IIS over fine-tuning epochs for each λ
  (λ = 0 is the cross-entropy-only control).

Every function returns a :class:`matplotlib.figure.Figure` and neither saves nor shows
it. Figures are built with the object-oriented API on an Agg canvas (no ``pyplot``, so no
global figure registry and no global ``rcParams`` change); all sizes are in inches and
points, so they do not depend on the dpi a figure is saved at.
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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

logger = logging.getLogger(__name__)

__all__ = ["iis_vs_accuracy", "sparsity_curves", "concept_gallery", "fine_tuning_curves"]

PERFECT_IIS = 0.98  # the trapezoid area under ARR = 1 over the grid (0 ... 0.98), METHOD §4
_DPI = 150
_FONT = 9.0
_SMALL = 7.5
_PANEL_W, _PANEL_H = 4.2, 3.4
_CORRECT, _WRONG = "#1a9641", "#d7191c"
_RANDOM_COLOR = "#7f7f7f"
_FIT_COLOR = "#404040"
_DIM = 0.25  # brightness kept outside a concept's mask
_SCORE_LABELS = {"iis": "IIS", "iis_chance_corrected": "chance-corrected IIS"}
_VALUE_LABELS = {
    "arr": "accuracy retention ratio ARR(s)",
    "arr_chance_corrected": "chance-corrected ARR(s)",
    "accuracy": "accuracy A(s)",
}
_COEFFICIENTS = (("pearson", "Pearson r"), ("spearman", "Spearman ρ"), ("kendall", "Kendall τ"))


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on an Agg canvas, sized in inches."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax: Axes) -> None:
    """Light grid behind the data, no top/right spines, explicit font sizes."""
    ax.set_axisbelow(True)
    ax.grid(True, color="#e3e3e3", linewidth=0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=_SMALL)
    ax.xaxis.label.set_size(_FONT)
    ax.yaxis.label.set_size(_FONT)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise a ValueError naming ``name`` if ``df`` lacks any of ``columns``."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}; expected at least {list(columns)}")
    if df.empty:
        raise ValueError(f"{name} must have at least one row")


def _ordered_unique(values: pd.Series) -> list[Any]:
    """Unique values in order of first appearance."""
    return list(pd.unique(values))


def _panel_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for ``n`` panels, at most 3 columns."""
    ncols = n if n <= 3 else (2 if n == 4 else 3)
    return math.ceil(n / ncols), ncols


def _panel_figure(n: int, extra_width: float = 0.0, extra_height: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` styled panels (unused grid cells left empty) plus room for an outside legend."""
    nrows, ncols = _panel_shape(n)
    fig = _new_figure(_PANEL_W * ncols + extra_width, _PANEL_H * nrows + extra_height)
    grid = fig.add_gridspec(nrows, ncols)
    axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n)]
    for ax in axes:
        _style_axes(ax)
    return fig, axes


def _palette(names: Sequence[Any]) -> dict[Any, tuple[float, float, float]]:
    """One colour-blind-safe colour per name, stable across panels."""
    n = len(names)
    colors = sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)
    return dict(zip(names, colors))


def _as_float(value: Any) -> float:
    """``value`` as a float; None and non-numbers become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or "n/a" for None/NaN."""
    v = _as_float(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def _fmt_p(value: Any) -> str:
    """A p-value: 3 decimals, scientific notation below 0.001, "n/a" for None/NaN."""
    v = _as_float(value)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"


# --------------------------------------------------------------------------- IIS vs accuracy


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
    _require_columns(iis_scores, base, "iis_scores")
    if not isinstance(score, str) or score not in iis_scores.columns:
        raise ValueError(f"score must name a column of iis_scores (e.g. 'iis'), got {score!r}")
    if not isinstance(correlation, Mapping):
        raise ValueError(
            "correlation must be a mapping concept_type -> score -> coefficients, "
            f"got {type(correlation).__name__}"
        )
    types = _ordered_unique(iis_scores["concept_type"])
    by_family = _has_families(iis_scores)
    fit_pretrained = scope is None and _scope_of(correlation, score) == "pretrained"
    fig, axes = _panel_figure(len(types), extra_width=2.2 if by_family else 0.0, extra_height=0.5)
    has_random = bool((iis_scores["weights"].astype(str) == "random").any())
    if by_family:  # one colour per family, the same in every figure of a study
        families = list(family_order) if family_order is not None else _ordered_unique(_family_names(iis_scores))
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
            ax.axhline(PERFECT_IIS, color=_FIT_COLOR, linestyle=":", linewidth=0.9)
        title = _correlation_title(ctype, correlation.get(ctype), score, len(group))
        ax.set_title(title, fontsize=_SMALL, loc="left")
        ax.set_xlabel("linear-probe accuracy $A_{std}$ (test)")
        ax.set_ylabel(_SCORE_LABELS.get(score, score))
        ax.margins(x=0.15, y=0.12)
    flags = [c for c in ("probe_converged", "heads_converged") if c in iis_scores.columns]
    converged = (iis_scores[flags].astype(bool).all(axis=1) if flags
                 else pd.Series(True, index=iis_scores.index))
    if by_family:  # markers are in the seaborn legend; here the lines and what the error bars mean
        err = "grey bars: ±std acc., bootstrap CI of IIS" if score == "iis" else "grey bars: ±std acc."
        handles = [Line2D([], [], color=_FIT_COLOR, linestyle="--",
                          label="least-squares fit" + (", pretrained" if fit_pretrained else "")),
                   Line2D([], [], color="0.75", label=err)]
        if score == "iis":
            handles.append(Line2D([], [], color=_FIT_COLOR, linestyle=":", label=f"perfect IIS ({PERFECT_IIS})"))
    else:
        handles = _score_legend_handles(has_random, score, fit_pretrained)
    if not converged.all():  # a legend entry (not loose text, which the legend would overlap)
        handles.append(Line2D([], [], linestyle="none", marker="$†$", color="0.2",
                              label="not converged at this budget (raise sweep.steps)"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=3,
        fontsize=_SMALL,
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
    fig.suptitle(f"{label} vs classifiability across {what}", fontsize=_FONT + 1)
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
    order = _ordered_unique(_family_names(iis_scores)) if "family" in iis_scores.columns else None
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
        palette=_palette(families), style="layer", size=size, sizes=sizes,
        size_order=list(sizes) if sizes else None,
        edgecolor="white", linewidth=0.5, zorder=3, ax=ax, legend="brief" if legend else False,
    )
    if legend:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=_SMALL,
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
    for mask, marker, color, size in ((~is_random, "o", "C0", 6), (is_random, "X", _RANDOM_COLOR, 8)):
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
    fontsize = _SMALL - 0.5
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
        xs, slope * xs + intercept, color=_FIT_COLOR, linestyle="--", linewidth=1.0, zorder=2, label="_fit"
    )


def _correlation_title(ctype: str, entry: Any, score: str, n_rows: int) -> str:
    """Concept type, n, and the three coefficients with p-values ("n/a" where missing)."""
    stats = entry.get(score) if isinstance(entry, Mapping) else None
    stats = stats if isinstance(stats, Mapping) else {}
    n = stats.get("n_backbones")
    n_txt = str(int(n)) if math.isfinite(_as_float(n)) else str(n_rows)
    lines = [f"{ctype} concepts (n = {n_txt} backbones)"]
    for key, label in _COEFFICIENTS:
        coef = stats.get(key)
        coef = coef if isinstance(coef, Mapping) else {}
        text = f"{label} = {_fmt(coef.get('r'))}"
        low, high = _as_float(coef.get("ci_low")), _as_float(coef.get("ci_high"))
        if math.isfinite(low) and math.isfinite(high):
            text += f" [{low:.2f}, {high:.2f}]"
        lines.append(f"{text}, p = {_fmt_p(coef.get('p'))}")
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
                color=_RANDOM_COLOR,
                linestyle="none",
                markersize=8,
                label="random-init control",
            )
        )
    handles.append(Line2D([], [], color=_FIT_COLOR, linestyle="--",
                          label="least-squares fit" + (", pretrained" if fit_pretrained else "")))
    if score == "iis":
        handles.append(Line2D([], [], color=_FIT_COLOR, linestyle=":", label=f"perfect IIS ({PERFECT_IIS})"))
    return handles


# --------------------------------------------------------------------------- sparsity curves


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
    _require_columns(curves, ["backbone", "concept_type", "seed", "sparsity", value], "curves")
    types = _ordered_unique(curves["concept_type"])
    backbones = _ordered_unique(curves["backbone"])
    colors = _palette(backbones)
    grid = np.sort(pd.unique(curves["sparsity"].astype(float)))
    stats = (
        curves.assign(sparsity=curves["sparsity"].astype(float))
        .groupby(["concept_type", "backbone", "sparsity"], sort=False)[value]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    fig, axes = _panel_figure(len(types), extra_width=1.6)
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
            ax.axhline(1.0, color=_FIT_COLOR, linestyle="--", linewidth=1.0, zorder=1)
        _sparsity_ticks(ax, grid)
        ax.set_ylim(y_min, y_max)
        ax.set_xlim(grid.min() - 0.02, grid.max() + 0.02)
        ax.set_title(f"{ctype} concepts", fontsize=_FONT)
        ax.set_xlabel("sparsity ratio s (fraction of concepts removed)")
        ax.set_ylabel(_VALUE_LABELS[value])
    handles = [Line2D([], [], color=colors[b], marker="o", markersize=4, label=str(b)) for b in backbones]
    if value != "accuracy":
        handles.append(Line2D([], [], color=_FIT_COLOR, linestyle="--", label="perfect retention"))
    handles.append(Patch(color="#999999", alpha=0.3, label="±std over seeds"))
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=_SMALL,
        title="backbone",
        title_fontsize=_SMALL,
        frameon=False,
    )
    fig.suptitle(f"{_VALUE_LABELS[value]} vs sparsity (mean over seeds)", fontsize=_FONT + 1)
    return fig


def _sparsity_ticks(ax: Axes, grid: np.ndarray) -> None:
    """Ticks at every grid value; labels vertical so crowded values (0.9, 0.95, 0.98) stay legible."""
    ax.set_xticks(grid)
    ax.set_xticklabels([f"{s:g}" for s in grid], rotation=90)
    ax.grid(True, axis="x", color="#f0f0f0", linewidth=0.6)


# --------------------------------------------------------------------------- concept gallery


def concept_gallery(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    explanation: pd.DataFrame,
    element_images: np.ndarray,
    concept_elements: Sequence[int],
    title: str = "",
    masks: np.ndarray | None = None,
    concept_names: Sequence[str] | None = None,
) -> Figure:
    """Test images beside the concepts that drove their predictions.

    One row per test image ``i`` (``explanation.sample == i`` indexes ``images`` and
    ``labels``): the image, titled with its true and predicted class and ✓/✗ (framed green
    or red), then its concepts in rank order (smallest rank = largest contribution). Each
    concept ``c`` is shown as its source element image
    ``element_images[concept_elements[c]]``, titled "concept c: +0.53" with the
    contribution ``a_c · W[pred, c]`` to the predicted class' logit. With ``masks`` (the
    elements' bool masks, ``(E, S, S)``) the area outside the mask is dimmed. A negative
    ``concept_elements[c]`` means "no element image" (e.g. a textual concept): a blank
    tile showing the concept's name.

    Args:
        images: ``(N, H, W, 3)`` uint8 test images.
        labels: the N true class indices.
        class_names: class index -> name.
        explanation: columns sample, predicted, rank, concept, contribution (as returned
            by :func:`iis_study.core.heads.explain`).
        element_images: ``(E, S, S, 3)`` uint8 element images.
        concept_elements: concept index -> element index (``-1``: none).
        title: figure title.
        masks: optional ``(E, S, S)`` element masks.
        concept_names: optional concept index -> name, added to the tile titles.

    Returns:
        The figure: ``N × (1 + T)`` axes, ``T`` the most concepts listed for one image.
    """
    images = _check_images(images, "images", square=False)
    element_images = _check_images(element_images, "element_images", square=True)
    n = len(images)
    labels = _check_labels(labels, n, len(class_names))
    _require_columns(explanation, ["sample", "predicted", "rank", "concept", "contribution"], "explanation")
    concept_elements = np.asarray(concept_elements, dtype=np.int64)
    _check_explanation(explanation, n, len(class_names), concept_elements, len(element_images))
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != element_images.shape[:3]:
            raise ValueError(f"masks must have shape {element_images.shape[:3]} (E, S, S), got {masks.shape}")
    if concept_names is not None and len(concept_names) < len(concept_elements):
        raise ValueError(
            f"concept_names must name every concept ({len(concept_elements)}), got {len(concept_names)} names"
        )
    per_sample = {int(s): g.sort_values("rank") for s, g in explanation.groupby("sample")}
    n_concepts = max([len(g) for g in per_sample.values()] + [1])
    cell_w, cell_h = 1.55, 1.95
    head = 0.45 if title else 0.25
    fig = _new_figure(cell_w * (1 + n_concepts) + 0.2, cell_h * n + head)
    grid = fig.add_gridspec(n, 1 + n_concepts, wspace=0.02, hspace=0.02)
    for i in range(n):
        rows = per_sample.get(i)
        predicted = int(rows["predicted"].iloc[0]) if rows is not None and len(rows) else None
        _image_tile(fig.add_subplot(grid[i, 0]), images[i], class_names, int(labels[i]), predicted)
        for j in range(n_concepts):
            ax = fig.add_subplot(grid[i, 1 + j])
            if rows is not None and j < len(rows):
                row = rows.iloc[j]
                c = int(row["concept"])
                name = None if concept_names is None else str(concept_names[c])
                element = int(concept_elements[c])
                _concept_tile(ax, element_images, masks, element, c, float(row["contribution"]), name)
            else:
                _blank_tile(ax, "no kept concept" if j == 0 else "")
    subtitle = (
        "each row: a test image, then the concepts kept for it, ranked by their contribution\n"
        "(activation × head weight) to the predicted class' logit"
    )
    fig.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=_FONT if title else _SMALL)
    return fig


def _check_images(arr: np.ndarray, name: str, square: bool) -> np.ndarray:
    """``arr`` as an ``(N, H, W, 3)`` uint8 array (``H == W`` if ``square``)."""
    arr = np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3 or (square and arr.shape[1] != arr.shape[2]):
        shape = "(E, S, S, 3)" if square else "(N, H, W, 3)"
        raise ValueError(f"{name} must be a {shape} RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {arr.dtype}")
    if len(arr) == 0 and not square:
        raise ValueError(f"{name} must hold at least one image")
    return arr


def _check_labels(labels: Sequence[int], n: int, n_classes: int) -> np.ndarray:
    """The labels as an int array of length ``n`` within ``[0, n_classes)``."""
    arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"labels must have one entry per image ({n}), got {len(arr)}")
    if n_classes == 0 or arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) (the class_names), got range [{arr.min()}, {arr.max()}]"
        )
    return arr


def _check_explanation(
    explanation: pd.DataFrame, n: int, n_classes: int, concept_elements: np.ndarray, n_elements: int
) -> None:
    """Samples index the images, classes the class names, concepts ``concept_elements``."""
    if concept_elements.ndim != 1:
        raise ValueError(
            f"concept_elements must be 1-D (concept -> element index), got shape {concept_elements.shape}"
        )
    checks = (
        ("sample", n, "images"),
        ("predicted", n_classes, "class_names"),
        ("concept", len(concept_elements), "concept_elements"),
    )
    for column, bound, against in checks:
        col = explanation[column].to_numpy()
        if (col < 0).any() or (col >= bound).any():
            raise ValueError(
                f"explanation.{column} must index {against} (range [0, {bound})), "
                f"got {sorted(set(col.tolist()))}"
            )
    if (concept_elements >= n_elements).any():
        raise ValueError(
            f"concept_elements must index element_images (< {n_elements}), got max {concept_elements.max()}"
        )
    if explanation.groupby("sample")["predicted"].nunique().gt(1).any():
        raise ValueError("explanation must give one predicted class per sample")


def _image_tile(
    ax: Axes, image: np.ndarray, class_names: Sequence[str], label: int, predicted: int | None
) -> None:
    """The test image titled with the true and predicted class, framed green (✓) or red (✗)."""
    ax.imshow(image, interpolation="nearest")
    _clear_ticks(ax)
    if predicted is None:
        ax.set_title(f"true: {class_names[label]}\npred: ?", fontsize=_SMALL)
        return
    ok = predicted == label
    color = _CORRECT if ok else _WRONG
    ax.set_title(
        f"true: {class_names[label]}\npred: {class_names[predicted]} {'✓' if ok else '✗'}",
        fontsize=_SMALL,
        color=color,
        fontweight="bold",
    )
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(3)


def _concept_tile(
    ax: Axes,
    element_images: np.ndarray,
    masks: np.ndarray | None,
    element: int,
    concept: int,
    contribution: float,
    name: str | None,
) -> None:
    """The concept's element image (dimmed outside its mask), titled with its contribution."""
    head = f"concept {concept}" + (f" ({name}):\n" if name else ": ")
    if element < 0:
        _blank_tile(ax, name or "(no image)")
    else:
        img = element_images[element]
        if masks is not None:
            img = _dim_outside(img, masks[element])
        ax.imshow(img, interpolation="nearest")
        _clear_ticks(ax)
    color = "#222222" if contribution >= 0 else _WRONG
    ax.set_title(f"{head}{contribution:+.2f}", fontsize=_SMALL, color=color)


def _dim_outside(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``img`` with the pixels outside ``mask`` darkened to ``_DIM`` brightness."""
    factor = np.where(mask[..., None], 1.0, _DIM)
    return (img.astype(np.float32) * factor).round().astype(np.uint8)


def _blank_tile(ax: Axes, text: str) -> None:
    """An empty tile, optionally with a centred note."""
    ax.axis("off")
    if text:
        ax.text(
            0.5, 0.5, text, ha="center", va="center", fontsize=_SMALL, color="#666666", transform=ax.transAxes
        )


def _clear_ticks(ax: Axes) -> None:
    """No ticks or tick labels, keep the frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("#bbbbbb")
        spine.set_linewidth(0.6)


# --------------------------------------------------------------------------- fine-tuning


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
    _require_columns(df, ["backbone", "lam", "seed", "epoch", "accuracy_test", "iis"], "df")
    backbones = _ordered_unique(df["backbone"])
    lams = sorted(pd.unique(df["lam"].astype(float)))
    colors = _lambda_colors(lams)
    nrows = len(backbones)
    fig = _new_figure(2 * _PANEL_W + 1.7, _PANEL_H * nrows + 0.3)
    grid = fig.add_gridspec(nrows, 2)
    panels = (("accuracy_test", "test accuracy"), ("iis", "IIS"))
    for r, backbone in enumerate(backbones):
        sub = df[df["backbone"] == backbone]
        for c, (column, label) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            _style_axes(ax)
            _lambda_lines(ax, sub, column, lams, colors)
            n_seeds = sub["seed"].nunique()
            ax.set_title(f"{backbone}: {label}", fontsize=_FONT)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{label} (mean of {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    handles: list[Any] = [
        Line2D([], [], color=colors[lam], marker="o", markersize=4, label=_lambda_label(lam)) for lam in lams
    ]
    handles.append(Patch(color="#999999", alpha=0.3, label="min–max over seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=_SMALL, frameon=False,
               title="interpretability weight", title_fontsize=_SMALL)
    fig.suptitle("Fine-tuning with interpretability maximisation vs the λ = 0 control", fontsize=_FONT + 1)
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
        ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes, fontsize=_FONT,
                color="#666666")
        return
    stats = (
        valid.assign(lam=valid["lam"].astype(float))
        .groupby(["lam", "epoch"])[column]
        .agg(["mean", "min", "max"])
        .reset_index()
    )
    for lam in lams:
        line = stats[stats["lam"] == lam].sort_values("epoch")
        if line.empty:
            continue
        x = line["epoch"].to_numpy(float)
        label = _lambda_label(lam)
        ax.plot(x, line["mean"], color=colors[lam], marker="o", markersize=3, linewidth=1.4, label=label)
        ax.fill_between(x, line["min"], line["max"], color=colors[lam], alpha=0.2, linewidth=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
