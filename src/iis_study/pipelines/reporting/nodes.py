"""Nodes of the reporting pipeline: gather every representation's scores, correlate, plot.
The science: :mod:`iis_study.core.reporting`; the figures: :mod:`iis_study.core.plots`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core import reporting
from iis_study.core.config import ConceptParams, CorrelationParams, GalleryParams
from iis_study.core.data import ImageSet


def collect_scores(
    backbones: dict[str, Any], concepts: ConceptParams, **results: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table of scores and one long table of curves over all representations and concept types;
    ``results``: every ``<backbone>.scores_<type>`` and ``<backbone>.curve_<type>``, by name."""
    return reporting.collect_scores(backbones, concepts, results)


def correlate_scores(iis_scores: pd.DataFrame, correlation: CorrelationParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS, per concept
    type and scope: the headline (pretrained representations) and every scope of ``correlation.groups``."""
    return reporting.correlate_scores(iis_scores, correlation)


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
    images: ImageSet,
    gallery: GalleryParams,
):
    """For a few test images: the prediction and the concepts that drove it, shown as their
    source patches or segments (the interpretation a person reads)."""
    return reporting.concept_gallery(features, sweep_result, concept_space, concept_elements, splits, images, gallery)
