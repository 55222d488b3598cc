"""The score as a library call, without Kedro: features and labels in, IIS with its interval out.

For researchers who already have features (from their own training code)::

    from iis_study.core.api import interpretability_score

    report = interpretability_score(
        train=(x_train, y_train), val=(x_val, y_val), test=(x_test, y_test),
        concepts=c,                      # (M, D) concept vectors, or element embeddings with concepts="cluster"
    )
    report.iis, report.iis_ci, report.converged
    report.curve                         # A(s) and ARR(s) per seed and sparsity

It runs exactly what the Kedro pipeline runs for one representation and one concept type: the
heads by the configured estimator (:func:`~iis_study.core.heads.fit_heads`; by default the convex
heads, each solved to a certified optimum), the L-BFGS reference probe
(:func:`~iis_study.core.convergence.reference_probe`) and the scores with their convergence record
(:func:`~iis_study.core.study.score_representation`, the pipeline's scoring node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .concepts import cluster_vectors, prototype_vectors
from .config import ScoringParams
from .convergence import reference_probe
from .heads import ConceptSpace, Split, SweepConfig, SweepResult, fit_heads
from .study import score_representation

__all__ = ["ScoreReport", "interpretability_score"]


@dataclass
class ScoreReport:
    """The IIS of one representation with one concept space, and how far to trust it.

    Attributes:
        iis: mean over seeds of the Inherent Interpretability Score (perfect: 0.98).
        iis_ci: percentile bootstrap interval over test images (level ``ci``).
        iis_chance_corrected: the same with ``(A(s) - 1/K) / (A_std - 1/K)`` (NaN at chance).
        accuracy_linear_probe: ``A_std``, test accuracy of the selected probe (mean over seeds).
        converged: convex: every head certified (gradient within the tolerance); adam: the probe is
            within 0.5 point of the L-BFGS reference and the IIS did not move between half and the
            full budget.
        convergence: the full record (``probe_converged``, ``heads_converged``, ``certified``,
            ``max_grad``, ``iterations`` or the adam budget test, ``reference_val_acc``, ...).
        curve: one row per seed and sparsity: accuracy, arr, arr_chance_corrected.
        summary: every number :func:`~iis_study.core.scores.score_sweep` returns.
        result: the sweep itself (selected heads, per-epoch history, trained parameters).
    """

    iis: float
    iis_ci: tuple[float, float]
    iis_chance_corrected: float
    accuracy_linear_probe: float
    converged: bool
    convergence: dict[str, Any]
    curve: pd.DataFrame
    summary: dict[str, Any]
    result: SweepResult = field(repr=False)


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
    concept_seed: int = 0,
    num_classes: int | None = None,
    sweep_config: SweepConfig | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    progress: bool = False,
) -> ScoreReport:
    """IIS of a representation given its features, with interval, curve and convergence record.

    Args:
        train, val, test: ``(features (N, D), integer labels (N,))``; heads are trained on train,
            epoch and learning rate chosen on val, accuracy reported on test.
        concepts: ``(M, D)`` concept vectors (rows are L2-normalised here), or
            ``("prototype", element_embeddings)`` / ``("cluster", element_embeddings)`` with ``m``.
        train, val, test: heads are fitted on train, the L2 strength (convex) or the epoch and
            learning rate (adam) chosen on val, accuracy reported on test.
        num_classes: K (default: the largest label + 1).
        sweep_config: the estimator and its grid (default: the study's, the convex heads).
        n_boot, ci: the bootstrap over test images.
    """
    splits = {name: _split(name, pair) for name, pair in (("train", train), ("val", val), ("test", test))}
    dims = {s.x.shape[1] for s in splits.values()}
    if len(dims) != 1:
        raise ValueError(f"train, val and test features must have the same dimension, got {sorted(dims)}")
    k = int(num_classes) if num_classes is not None else int(max(int(s.y.max()) for s in splits.values())) + 1
    space = _concept_space(concepts, m, concept_seed)
    space.validate(dims.pop())
    cfg = sweep_config or SweepConfig()
    result = fit_heads(splits["train"], splits["val"], splits["test"], {"concepts": space}, k, cfg, progress=progress)
    result = result["concepts"]
    ref = reference_probe(*((s.x, s.y) for s in splits.values()), num_classes=k)
    summary, curve = score_representation(result, ref.to_dict(), ScoringParams(n_boot=n_boot, ci=ci))
    record_keys = ("estimator", "probe_converged", "heads_converged", "certified", "max_grad", "max_grad_all",
                   "iterations", "tolerance", "uncertified", "probe_val_acc", "reference_val_acc",
                   "reference_test_acc", "reference_c", "steps", "batch_size", "epochs", "budget_delta",
                   "budget_delta_ci_low", "budget_delta_ci_high", "iis_half_budget", "budget_converged",
                   "probe_gap", "flat_end", "max_gain_selected", "n_rising", "n_heads")
    record = {key: summary[key] for key in record_keys if key in summary}
    return ScoreReport(
        iis=summary["iis"],
        iis_ci=(summary["iis_ci_low"], summary["iis_ci_high"]),
        iis_chance_corrected=summary["iis_chance_corrected"],
        accuracy_linear_probe=summary["accuracy_linear_probe"],
        converged=bool(record["probe_converged"] and record["heads_converged"]),
        convergence=record,
        curve=curve,
        summary=summary,
        result=result,
    )
