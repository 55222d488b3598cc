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
    "concept_type",
    "model",
    "weights",
    "accuracy_linear_probe",
    "accuracy_linear_probe_std",
    "iis",
    "iis_std",
    "iis_ci_low",
    "iis_ci_high",
    "iis_chance_corrected",
    "n_seeds",
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
                    "concept_type": ctype,
                    "model": spec.get("model"),
                    "weights": spec.get("weights", "offline"),
                    **scores,
                }
            )
            c = curve.copy()
            c.insert(0, "concept_type", ctype)
            c.insert(0, "backbone", name)
            curves.append(c)
    table = pd.DataFrame(rows)
    table = table[[c for c in SCORE_COLUMNS if c in table] + [c for c in table if c not in SCORE_COLUMNS]]
    return table, pd.concat(curves, ignore_index=True)


def correlate_scores(iis_scores: pd.DataFrame, correlation: dict[str, Any]) -> dict[str, Any]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS (and the
    chance-corrected IIS), per concept type, with p-values and bootstrap intervals over backbones."""
    out: dict[str, Any] = {}
    for ctype, group in iis_scores.groupby("concept_type", sort=False):
        out[ctype] = {}
        for score in correlation.get("scores", ["iis", "iis_chance_corrected"]):
            res = correlate(
                group["accuracy_linear_probe"].to_numpy(),
                group[score].to_numpy(),
                n_boot=int(correlation.get("n_boot", 2000)),
                seed=int(correlation.get("seed", 0)),
                ci=float(correlation.get("ci", 0.95)),
            )
            n = int(res.pop("n", len(group)))
            entry = {k: {kk: _clean(vv) for kk, vv in v.items()} for k, v in res.items()}
            entry["n_backbones"] = n
            out[ctype][score] = entry
            logger.info(
                "%s / %s over %d backbones: Pearson %.3f, Spearman %.3f, Kendall %.3f",
                ctype,
                score,
                n,
                entry["pearson"]["r"],
                entry["spearman"]["r"],
                entry["kendall"]["r"],
            )
    return out


def _clean(v: Any) -> Any:
    """JSON has no NaN: write null."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def plot_iis_vs_accuracy(iis_scores: pd.DataFrame, correlation: dict[str, Any]):
    """IIS against linear-probe accuracy, one point per backbone, per concept type."""
    from iis_study.core import plots

    return plots.iis_vs_accuracy(iis_scores, correlation, score="iis")


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
