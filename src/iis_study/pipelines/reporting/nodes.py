"""Nodes of the reporting pipeline: gather every backbone's scores, correlate, plot."""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from iis_study.core.scores import correlate

logger = logging.getLogger(__name__)

SCORE_COLUMNS = [
    "backbone",
    "representation",
    "concept_type",
    "model",
    "weights",
    "family",
    "layer",
    "input_size",
    "accuracy_linear_probe",
    "accuracy_linear_probe_std",
    "iis",
    "iis_std",
    "iis_ci_low",
    "iis_ci_high",
    "iis_chance_corrected",
    "n_seeds",
    "steps",
    "batch_size",
    "probe_converged",
    "heads_converged",
    "probe_val_acc",
    "reference_val_acc",
]


def collect_scores(
    backbones: dict[str, Any], concepts: dict[str, Any], *scores_and_curves: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table of scores and one long table of curves over all backbones and concept types.

    ``scores_and_curves`` holds, for each backbone (in ``backbones`` order) and each concept type
    (in ``concepts.types`` order), its scores dict followed by its curve table.
    """
    types = list(concepts["types"])
    expected = 2 * len(backbones) * len(types)
    if len(scores_and_curves) != expected:
        raise ValueError(f"collect_scores: expected {expected} inputs, got {len(scores_and_curves)}")
    rows, curves = [], []
    it = iter(scores_and_curves)
    for name, spec in backbones.items():
        for ctype in types:
            scores, curve = next(it), next(it)
            rows.append(
                {
                    "backbone": name,
                    "representation": spec.get("label") or name,
                    "concept_type": ctype,
                    "model": spec.get("model"),
                    "weights": spec.get("weights", "offline"),
                    "family": spec.get("family"),
                    "layer": spec.get("layer", "penultimate"),
                    "input_size": spec.get("input_size"),
                    **scores,
                }
            )
            c = curve.copy()
            c.insert(0, "concept_type", ctype)
            c.insert(0, "backbone", name)
            curves.append(c)
    table = pd.DataFrame(rows)
    table = table[[c for c in SCORE_COLUMNS if c in table] + [c for c in table if c not in SCORE_COLUMNS]]
    for flag, what in (("probe_converged", "linear probe"), ("heads_converged", "interpretation heads")):
        if flag in table and not table[flag].astype(bool).all():
            bad = table.loc[~table[flag].astype(bool), ["representation", "concept_type"]]
            logger.warning(
                "NOT converged (%s): %s; their scores are marked in the plots -- raise sweep.steps",
                what,
                ", ".join(f"{r}/{c}" for r, c in bad.itertuples(index=False)),
            )
    return table, pd.concat(curves, ignore_index=True)


CORRELATION_GROUPS = ("all", "pretrained", "family")


def correlation_groups(correlation: dict[str, Any]) -> list[str]:
    """The scopes of ``correlation.groups`` (default: all three), checked.

    - ``all``: every representation of the study (random-init controls included);
    - ``pretrained``: every representation whose weights are not ``random``;
    - ``family``: within each family (same weights, varying layer and/or resolution); representations
      without a ``family`` take part in no family group.
    """
    groups = correlation.get("groups", list(CORRELATION_GROUPS))
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, (list, tuple)) or not groups or set(groups) - set(CORRELATION_GROUPS):
        raise ValueError(
            f"correlation.groups must be a non-empty subset of {list(CORRELATION_GROUPS)}, got {groups!r}"
        )
    return list(dict.fromkeys(groups))


def _correlate_table(table: pd.DataFrame, correlation: dict[str, Any], scope: str, group: str) -> dict[str, Any]:
    """``{concept_type: {score: coefficients}}`` over the rows of ``table``."""
    out: dict[str, Any] = {}
    for ctype, rows in table.groupby("concept_type", sort=False):
        out[ctype] = {}
        for score in correlation.get("scores", ["iis", "iis_chance_corrected"]):
            finite = rows[score].notna() & rows["accuracy_linear_probe"].notna()
            if not finite.all():
                left_out = rows.loc[~finite, "representation" if "representation" in rows else "backbone"]
                logger.warning(
                    "[%s %s] %s / %s: left out of the correlation (score undefined, e.g. A_std <= 1/K): %s",
                    scope, group, ctype, score, ", ".join(map(str, left_out)),
                )
            res = correlate(
                rows.loc[finite, "accuracy_linear_probe"].to_numpy(),
                rows.loc[finite, score].to_numpy(),
                n_boot=int(correlation.get("n_boot", 2000)),
                seed=int(correlation.get("seed", 0)),
                ci=float(correlation.get("ci", 0.95)),
            )
            n = int(res.pop("n", len(rows)))
            entry: dict[str, Any] = {k: {kk: _clean(vv) for kk, vv in v.items()} for k, v in res.items()}
            entry["n_backbones"] = n
            entry["scope"] = scope
            entry["left_out"] = [str(v) for v in rows.loc[~finite, "backbone"]]
            out[ctype][score] = entry
            logger.info(
                "[%s %s] %s / %s over %d representations: Pearson %s, Spearman %s, Kendall %s",
                scope,
                group,
                ctype,
                score,
                n,
                *(_fmt(entry[m]["r"]) for m in ("pearson", "spearman", "kendall")),
            )
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _scope_tables(iis_scores: pd.DataFrame, groups: list[str]) -> list[tuple[str, str, pd.DataFrame]]:
    """(scope, group, rows) for every requested scope."""
    out = []
    for scope in groups:
        if scope == "all":
            out.append(("all", "all", iis_scores))
        elif scope == "pretrained":
            out.append(("pretrained", "pretrained", iis_scores[iis_scores["weights"].astype(str) != "random"]))
        elif scope == "family" and "family" in iis_scores:
            fam = iis_scores["family"]
            for name in pd.unique(fam[fam.notna()]):
                out.append(("family", str(name), iis_scores[fam == name]))
    return out


def correlate_scores(iis_scores: pd.DataFrame, correlation: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS (and the
    chance-corrected IIS), per concept type, with p-values and bootstrap intervals over representations.

    Returns:
        ``correlation``: the headline, over the pretrained representations (METHOD §6 correlates
        across pretrained backbones; over all of them when the study has no pretrained one or the
        scope is not requested), ``{concept_type: {score: {"pearson": {"r", "p", "ci_low",
        "ci_high"}, "spearman": ..., "kendall": ..., "n_backbones": n, "scope": ..., "left_out":
        [...]}}}``; a representation whose score is undefined (NaN) is left out with a warning;
        ``correlation_scopes``: ``{"groups": [{"scope", "group", "representations", "n_representations",
        "correlation": {concept_type: {score: ...}}}, ...]}``, one record per scope of
        ``correlation.groups`` (``all``; ``pretrained``; ``family``: one record per family).
    """
    groups = correlation_groups(correlation)
    records = []
    for scope, group, rows in _scope_tables(iis_scores, groups):
        names = list(pd.unique(rows["representation"] if "representation" in rows else rows["backbone"]))
        records.append(
            {
                "scope": scope,
                "group": group,
                "representations": [str(n) for n in names],
                "n_representations": len(names),
                "correlation": _correlate_table(rows, correlation, scope, group),
            }
        )
    # the headline: across pretrained representations (METHOD §6), else over all of them
    headline = next((r["correlation"] for r in records if r["scope"] == "pretrained" and r["n_representations"]), None)
    if headline is None:
        headline = next((r["correlation"] for r in records if r["scope"] == "all"), None)
    if headline is None:
        headline = _correlate_table(iis_scores, correlation, "all", "all")
    return headline, {"groups": records}


def correlation_table(correlation_scopes: dict[str, Any]) -> pd.DataFrame:
    """The scoped correlations as one long table: scope, group, concept_type, score, method, r, p,
    ci_low, ci_high, n (for notebooks and reports)."""
    rows = []
    for rec in correlation_scopes.get("groups", []):
        for ctype, by_score in rec["correlation"].items():
            for score, entry in by_score.items():
                for method in ("pearson", "spearman", "kendall"):
                    rows.append(
                        {
                            "scope": rec["scope"],
                            "group": rec["group"],
                            "concept_type": ctype,
                            "score": score,
                            "method": method,
                            **entry[method],
                            "n": entry["n_backbones"],
                        }
                    )
    return pd.DataFrame(rows)


def _clean(v: Any) -> Any:
    """JSON has no NaN: write null."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def plot_iis_vs_accuracy(iis_scores: pd.DataFrame, correlation: dict[str, Any]):
    """IIS against linear-probe accuracy, one point per representation (labelled with its readable
    name, e.g. ``lite0@96/stage3``), per concept type."""
    from iis_study.core import plots

    if "representation" in iis_scores:
        iis_scores = iis_scores.assign(backbone=iis_scores["representation"].fillna(iis_scores["backbone"]))
    return plots.iis_vs_accuracy(iis_scores, correlation, score="iis")


def plot_iis_vs_accuracy_scopes(iis_scores: pd.DataFrame, correlation_scopes: dict[str, Any]):
    """One IIS-vs-accuracy figure per correlation scope (all, pretrained, each family, ...)."""
    from iis_study.core import plots

    if "representation" in iis_scores:
        iis_scores = iis_scores.assign(backbone=iis_scores["representation"].fillna(iis_scores["backbone"]))
    figures = plots.iis_vs_accuracy_by_scope(iis_scores, correlation_scopes, score="iis")
    if not figures:  # e.g. correlation.groups: [family] without families; a versioned save needs a file
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no correlation scope with representations", ha="center", va="center")
        figures = {"none": fig}
    return {f"{name}.png": fig for name, fig in figures.items()}  # file names in the dataset's folder


def plot_sparsity_curves(sparsity_curves: pd.DataFrame):
    """ARR against sparsity for every backbone, per concept type."""
    from iis_study.core import plots

    return plots.sparsity_curves(sparsity_curves, value="arr")


def plot_concept_gallery(
    features: dict[str, Any],
    sweep_result: Any,
    concept_space: dict[str, Any],
    concept_elements: Any,
    splits: pd.DataFrame,
    dataset: dict[str, Any],
    gallery: dict[str, Any],
):
    """For a few test images: the prediction and the concepts that drove it, shown as their
    source patches or segments (the interpretation a person reads)."""
    import numpy as np

    from iis_study.core import plots
    from iis_study.core.data import DatasetSpec, load_dataset
    from iis_study.core.heads import explain
    from iis_study.pipelines.interpretability.nodes import concept_space as to_space

    space = to_space(concept_space)
    test_rows = splits[splits["split"] == "test"].reset_index(drop=True)
    if "test.index" in features:  # keep only the images that have features (skipped files left out)
        test_rows = test_rows.set_index("index").loc[features["test.index"].numpy()].reset_index()
    n = min(int(gallery.get("n_images", 6)), len(test_rows))
    rng = np.random.default_rng(int(gallery.get("seed", 0)))
    pick = np.sort(rng.choice(len(test_rows), size=n, replace=False))
    z = features["test.x"][pick]
    explanation = explain(
        sweep_result, space, z, sparsity=float(gallery.get("sparsity", 0.9)), top=int(gallery.get("top", 5))
    )
    images = load_dataset(DatasetSpec.from_params(dataset))
    imgs = np.stack([images.load(int(i)) for i in test_rows.loc[pick, "index"]])
    element_ids = concept_space["element_ids"].numpy()
    return plots.concept_gallery(
        imgs,
        test_rows.loc[pick, "label"].to_numpy(),
        list(images.classes),
        explanation,
        concept_elements.images,
        element_ids,
        title=f"{concept_space.get('__metadata__', {}).get('concept_type', '')} concepts, "
        f"sparsity {gallery.get('sparsity', 0.9)}",
        masks=concept_elements.masks,
    )
