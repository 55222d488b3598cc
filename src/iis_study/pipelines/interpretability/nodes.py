"""Nodes of the interpretability pipeline: the batched sweep and the scores (METHOD §2-§4, §7).
The science: :mod:`iis_study.core.study`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core import study
from iis_study.core.acquisition import ConceptSet
from iis_study.core.config import ScoringParams
from iis_study.core.features import FeatureSet
from iis_study.core.heads import SweepConfig, SweepResult


def train_interpreters(
    features: FeatureSet, feature_info: dict[str, Any], sweep: SweepConfig, **concepts: ConceptSet
) -> dict[str, SweepResult]:
    """Train the linear probe and, for every concept type given by keyword, every interpretation head
    of the sparsity x learning-rate x seed grid together, as one batched model (the probe once,
    shared by the concept types); select epoch and learning rate on val, report test accuracy.
    Returns one :class:`SweepResult` per concept type."""
    return study.train_representation(features, feature_info, sweep, concepts)


def fit_reference_probe(features: FeatureSet, feature_info: dict[str, Any]) -> dict[str, Any]:
    """The converged reference for the probe: full-batch L-BFGS logistic regression on the same
    features, its L2 strength selected on val (METHOD §4, "Budget and convergence")."""
    return study.fit_reference(features, feature_info)


def score_interpreters(
    result: SweepResult, probe_reference: dict[str, Any], scoring: ScoringParams
) -> tuple[dict[str, Any], pd.DataFrame]:
    """IIS, chance-corrected IIS, bootstrap interval, and the accuracy curve A(s) / ARR(s), with the
    training budget and the convergence record (probe against its reference, flat val curves)."""
    return study.score_representation(result, probe_reference, scoring)
