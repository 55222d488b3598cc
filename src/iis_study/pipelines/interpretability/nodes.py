"""Nodes of the interpretability pipeline: the batched sweep and the scores (METHOD §2-§4, §7).
The science: :mod:`iis_study.core.scoring.steps`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core.scoring import steps
from iis_study.core.concepts.acquisition import ConceptSet
from iis_study.core.scoring.calibration import DrawResults
from iis_study.core.scoring.blocks import ScoringParams, SpecificationParams, WeightSparsityParams
from iis_study.core.scoring.convergence import ReferenceProbe
from iis_study.core.representations.features import FeatureSet
from iis_study.core.heads import SweepParams, SweepResult
from iis_study.core.concepts.nulls import ConceptDraws
from iis_study.core.scoring.results import Scores


def train_interpreters(
    features: FeatureSet, feature_info: dict[str, Any], sweep: SweepParams, concept_draws: ConceptDraws,
    **concepts: ConceptSet,
) -> tuple[SweepResult | DrawResults, ...]:
    """Every head of one representation, one batched solve: :func:`~iis_study.core.scoring.steps.train_representation`."""
    return steps.train_representation(features, feature_info, sweep, concepts, concept_draws)


def fit_weight_sparsity(
    features: FeatureSet, feature_info: dict[str, Any], concept_draws: ConceptDraws,
    weight_sparsity: WeightSparsityParams, **concepts: ConceptSet,
) -> pd.DataFrame:
    """The final layer's elastic-net path on every concept set: :func:`~iis_study.core.scoring.steps.weight_sparsity_path`."""
    return steps.weight_sparsity_path(features, feature_info, concept_draws, weight_sparsity, concepts)


def fit_reference_probe(features: FeatureSet, feature_info: dict[str, Any]) -> ReferenceProbe:
    """The representation's L-BFGS reference probe: :func:`~iis_study.core.scoring.steps.fit_reference`."""
    return steps.fit_reference(features, feature_info)


def score_interpreters(
    result: SweepResult, draws: DrawResults, probe_reference: ReferenceProbe, scoring: ScoringParams,
    weight_sparsity_path: pd.DataFrame, weight_sparsity: WeightSparsityParams,
) -> tuple[Scores, pd.DataFrame]:
    """A concept type's scores beside its nulls, and its curve: :func:`~iis_study.core.scoring.steps.score_representation`."""
    return steps.score_representation(result, probe_reference, scoring, draws, weight_sparsity_path, weight_sparsity)


def fit_probe_variants(
    features: FeatureSet, feature_info: dict[str, Any], sweep: SweepParams, specification: SpecificationParams,
) -> pd.DataFrame:
    """The probe on the specification curve's other inputs: :func:`~iis_study.core.scoring.steps.fit_probe_variants`."""
    return steps.fit_probe_variants(features, feature_info, sweep, specification)


def collect_specification_inputs(
    result: SweepResult, draws: DrawResults, probe_variants: pd.DataFrame, probe_reference: ReferenceProbe,
    backbone: str = "", concept_type: str = "",
) -> pd.DataFrame:
    """A concept type's accuracies of every head, draw, null and probe, marked by backbone and concept type (the
    pipeline binds both): :func:`~iis_study.core.scoring.steps.specification_table`."""
    return steps.specification_table(result, draws, probe_variants, probe_reference, backbone, concept_type)
