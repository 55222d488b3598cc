"""The score as a library call, without Kedro: features and labels in, IIS with its interval out.

For researchers who already have features (from their own training code)::

    from iis_study.core.api import interpretability_score

    report = interpretability_score(
        train=(x_train, y_train), val=(x_val, y_val), test=(x_test, y_test),
        concepts=c,                      # (M, D) concept vectors, or element embeddings with concepts="cluster"
    )
    report.iis, report.iis_ci, report.converged
    report.scores["max_grad"]            # every field of the pipeline's scores record
    report.curve                         # A(s) and ARR(s) per seed and sparsity

It runs exactly what the Kedro pipeline runs for one representation and one concept type, through the same
functions (:mod:`~iis_study.core.scoring.steps`): the heads by the configured estimator (by default the convex heads,
each solved to a certified optimum), the L-BFGS reference probe and the scores with their convergence record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .scoring import steps
from .concepts.vectors import cluster_vectors, prototype_vectors
from .scoring.calibration import DrawResults
from .concepts.blocks import ConceptParams
from .scoring.blocks import ScoringParams, WeightSparsityParams
from .heads import ConceptSpace, Split, SweepParams, SweepResult
from .params import block_values
from .scoring.results import Scores
from .scoring.weight_sparsity import elastic_net_paths

__all__ = ["ScoreReport", "interpretability_score"]


@dataclass
class ScoreReport:
    """The IIS of one representation with one concept space, and how far to trust it.

    ``scores`` is the pipeline's record (:class:`~iis_study.core.scoring.results.Scores`, a row of ``iis_scores.csv``);
    the attributes below read it.

    Attributes:
        scores: every number the pipeline reports for one concept type: ``iis``, its interval, the
            chance-corrected IIS, ``A_std``, the certificate (``certified``, ``max_grad``, ``iterations``)
            or the adam budget test, the reference probe (``scores["reference_val_acc"]``), ...
        curve: one row per seed and sparsity: accuracy, arr, arr_chance_corrected (``concept_set`` ``concepts``,
            ``draw`` 0: the one concept set scored here).
        result: the sweep itself (every head, the selected ones, their parameters, the certificate).
    """

    scores: Scores
    curve: pd.DataFrame
    result: SweepResult = field(repr=False)

    @property
    def iis(self) -> float:
        """The Inherent Interpretability Score (mean over seeds; 0.98 when every head matches the probe, above it
        when the heads beat the probe on the test split)."""
        return self.scores.iis

    @property
    def iis_ci(self) -> tuple[float, float]:
        """Its percentile bootstrap interval over test images (level ``scoring.ci``)."""
        return self.scores.iis_ci

    @property
    def iis_chance_corrected(self) -> float:
        """The IIS with ``(A(s) - 1/K) / (A_std - 1/K)`` (NaN at chance)."""
        return self.scores.iis_chance_corrected

    @property
    def accuracy_linear_probe(self) -> float:
        """``A_std``, test accuracy of the selected probe (mean over seeds)."""
        return self.scores.accuracy_linear_probe

    @property
    def converged(self) -> bool:
        """convex: every head certified (gradient within the tolerance); adam: the probe is within 0.5
        point of the L-BFGS reference and the IIS did not move between half and the full budget."""
        return self.scores.converged

    @property
    def summary(self) -> dict[str, Any]:
        """Every number of :attr:`scores` as a dict (the row of ``iis_scores.csv``)."""
        return self.scores.to_dict()


def _split(name: str, pair: Any) -> Split:
    try:
        x, y = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (features, labels), got {type(pair).__name__}") from None
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{name}: features must be (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    return Split(x=x, y=y)


def _concept_space(concepts: Any, m: int | None, seed: int) -> ConceptSpace:
    if isinstance(concepts, ConceptSpace):
        return concepts
    if isinstance(concepts, tuple) and len(concepts) == 2 and isinstance(concepts[0], str):
        kind, elements = concepts
        emb = torch.as_tensor(np.asarray(elements, dtype=np.float32))
        if m is None:
            raise ValueError(f"concepts=({kind!r}, elements) needs m, the number of concepts")
        if kind == "prototype":
            return ConceptSpace("vectors", vectors=prototype_vectors(emb, m, seed))
        if kind == "cluster":
            return ConceptSpace("vectors", vectors=cluster_vectors(emb, m, seed=seed)[0])
        raise ValueError(f"concepts kind must be 'prototype' or 'cluster', got {kind!r}")
    vectors = torch.as_tensor(np.asarray(concepts, dtype=np.float32))
    if vectors.ndim != 2:
        raise ValueError(f"concepts must be (M, D) concept vectors, got shape {tuple(vectors.shape)}")
    return ConceptSpace("vectors", vectors=torch.nn.functional.normalize(vectors, dim=1))


def interpretability_score(
    train: tuple[Any, Any],
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    concepts: Any,
    *,
    m: int | None = None,
    concept_seed: int | None = None,
    num_classes: int | None = None,
    sweep_config: SweepParams | Mapping[str, Any] | None = None,
    scoring: ScoringParams | Mapping[str, Any] | None = None,
    weight_sparsity: WeightSparsityParams | Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ScoreReport:
    """IIS of a representation given its features, with interval, curve and convergence record.

    The same calls as the pipeline's for one representation (:func:`~iis_study.core.scoring.steps.train_splits`,
    :func:`~iis_study.core.scoring.steps.reference_for_splits`, :func:`~iis_study.core.scoring.steps.score_representation`),
    with the same defaults (the ``sweep`` and ``scoring`` blocks), so the report holds the same fields.

    Args:
        train, val, test: ``(features (N, D), integer labels (N,))``; heads are fitted on train, the L2
            strength (convex) or the epoch and learning rate (adam) chosen on val, accuracy reported on test.
        concepts: ``(M, D)`` concept vectors (rows are L2-normalised here), or
            ``("prototype", element_embeddings)`` / ``("cluster", element_embeddings)`` with ``m``.
        concept_seed: the prototype sample / KMeans seed (default: the ``concepts`` block's ``seed``).
        num_classes: K (default: the largest label + 1).
        sweep_config: the estimator and its grid (a ``SweepParams`` or a ``sweep`` block; default: the study's,
            the convex heads).
        scoring: the bootstrap over test images (a ``ScoringParams`` or a ``scoring`` block: ``n_boot``,
            ``seed``, ``ci``; default: the study's).
        weight_sparsity: the final layer's elastic-net path, NEC and ANEC (a ``weight_sparsity`` block; default:
            the study's; ``{"enabled": False}`` skips it). Concept vectors only.
    """
    splits = {name: _split(name, pair) for name, pair in (("train", train), ("val", val), ("test", test))}
    dims = {s.x.shape[1] for s in splits.values()}
    if len(dims) != 1:
        raise ValueError(f"train, val and test features must have the same dimension, got {sorted(dims)}")
    k = int(num_classes) if num_classes is not None else int(max(int(s.y.max()) for s in splits.values())) + 1
    (concept_seed,) = block_values(ConceptParams, seed=concept_seed)
    space = _concept_space(concepts, m, concept_seed)
    space.validate(dims.pop())
    results, _ = steps.train_splits(splits, k, sweep_config, {"concepts": space}, progress=progress)
    reference = steps.reference_for_splits(splits, k)
    ws = WeightSparsityParams.from_params(weight_sparsity or {})
    paths, one = None, DrawResults(correct={}, certified={}, draws=1, nulls=(), concept_type="concepts")
    if ws.enabled and space.kind == "vectors":
        paths = elastic_net_paths(splits["train"], splits["val"], splits["test"], {"draw/concepts/0": space.vectors},
                                  k, ws)
    scores, curve = steps.score_representation(results["concepts"], reference, scoring, one, paths, ws)
    return ScoreReport(scores=scores, curve=curve, result=results["concepts"])
