"""Nodes of the interpretability pipeline: the batched sweep and the scores (METHOD §2-§4, §7).
The science: :mod:`iis_study.core.study`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core import study
from iis_study.core.acquisition import ConceptSet
from iis_study.core.calibration import DrawResults
from iis_study.core.config import ScoringParams
from iis_study.core.features import FeatureSet
from iis_study.core.heads import SweepConfig, SweepResult
from iis_study.core.nulls import ConceptDraws


def train_interpreters(
    features: FeatureSet, feature_info: dict[str, Any], sweep: SweepConfig, concept_draws: ConceptDraws,
    **concepts: ConceptSet,
) -> dict[str, Any]:
    """Every head of every concept type, concept draw and null set of one representation, one batched
    solve: ``sweep_<type>`` and ``draws_<type>`` (``study.train_representation``)."""
    sweeps, draws = study.train_representation(features, feature_info, sweep, concepts, concept_draws)
    return {**{f"sweep_{t}": r for t, r in sweeps.items()}, **{f"draws_{t}": d for t, d in draws.items()}}


def fit_reference_probe(features: FeatureSet, feature_info: dict[str, Any]) -> dict[str, Any]:
    """The converged reference for the probe: full-batch L-BFGS logistic regression on the same
    features, its L2 strength selected on val (METHOD §4, "Budget and convergence")."""
    return study.fit_reference(features, feature_info)


def score_interpreters(
    result: SweepResult, draws: DrawResults, probe_reference: dict[str, Any], scoring: ScoringParams
) -> tuple[dict[str, Any], pd.DataFrame]:
    """A concept type's scores beside its nulls, and its curve (``study.score_representation``)."""
    return study.score_representation(result, probe_reference, scoring, draws)
