"""Nodes of the reporting pipeline: gather every representation's scores, correlate, plot.
The science: :mod:`iis_study.core.reporting.report`; the figures: :mod:`iis_study.core.reporting.plots`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core.reporting import report
from iis_study.core.concepts.acquisition import ConceptSet
from iis_study.core.concepts.elements import Elements
from iis_study.core.concepts.blocks import ConceptParams
from iis_study.core.scoring.blocks import CorrelationParams, SpecificationParams
from iis_study.core.reporting.blocks import GalleryParams
from iis_study.core.data import ImageSet
from iis_study.core.representations.features import FeatureSet
from iis_study.core.heads import SweepParams, SweepResult
from iis_study.core.scoring.results import Scores


def collect_scores(
    backbones: dict[str, Any], concepts: ConceptParams, *results: Scores | pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's score and curve tables: :func:`~iis_study.core.reporting.report.collect_scores`."""
    return report.collect_scores(backbones, concepts, results)


def correlate_scores(iis_scores: pd.DataFrame, correlation: CorrelationParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS, per concept
    type and scope: the headline (pretrained representations) and every scope of ``correlation.groups``."""
    return report.correlate_scores(iis_scores, correlation)


def specification_curve(
    iis_scores: pd.DataFrame, specification: SpecificationParams, sweep: SweepParams, concepts: ConceptParams,
    *inputs: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The correlation under every specification and its verdict: :func:`~iis_study.core.reporting.report.specification_curve`."""
    return report.specification_curve(iis_scores, specification, sweep, concepts, inputs)


def plot_specification_curve(specification_curve: pd.DataFrame, specification_verdict: dict[str, Any]):
    """Pearson r under every specification, sorted: :func:`~iis_study.core.reporting.report.specification_figure`."""
    return report.specification_figure(specification_curve, specification_verdict)


def plot_iis_vs_accuracy(iis_scores: pd.DataFrame, correlation: dict[str, Any]):
    """IIS against linear-probe accuracy, one point per representation (labelled with its readable
    name, e.g. ``lite0@96/stage3``), per concept type."""
    return report.iis_vs_accuracy_figure(iis_scores, correlation)


def plot_iis_vs_accuracy_scopes(iis_scores: pd.DataFrame, correlation_scopes: dict[str, Any]):
    """One IIS-vs-accuracy figure per correlation scope (all, pretrained, each family, ...), by file name."""
    return report.scope_figures(iis_scores, correlation_scopes)


def plot_iis_with_nulls(iis_scores: pd.DataFrame):
    """Each representation's IIS beside its nulls: :func:`~iis_study.core.reporting.report.nulls_figure`."""
    return report.nulls_figure(iis_scores)


def plot_anec_with_nulls(iis_scores: pd.DataFrame):
    """Each representation's ANEC-avg beside its nulls': :func:`~iis_study.core.reporting.report.anec_nulls_figure`."""
    return report.anec_nulls_figure(iis_scores)


def plot_sparsity_curves(sparsity_curves: pd.DataFrame):
    """ARR against sparsity for every representation, per concept type."""
    return report.sparsity_figure(sparsity_curves)


def plot_concept_gallery(
    features: FeatureSet,
    sweep_result: SweepResult,
    concepts: ConceptSet,
    concept_elements: Elements,
    splits: pd.DataFrame,
    images: ImageSet,
    gallery: GalleryParams,
):
    """For a few test images: the prediction and the concepts that drove it, shown as their
    source patches or segments (the interpretation a person reads)."""
    return report.concept_gallery(features, sweep_result, concepts, concept_elements, splits, images, gallery)
