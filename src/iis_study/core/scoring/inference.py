"""Inference across representations that fits the study (docs/calibration.md).

* :func:`permutation_p` -- two-sided permutation p-value of a correlation: every one of the n!
  orderings when n <= ``EXACT_MAX`` (8), else ``n_perm`` random ones (``(1 + hits) / (1 + n_perm)``).
* :func:`correlate_across` -- Pearson / Spearman / Kendall with their parametric and permutation
  p-values and a bootstrap interval that resamples whole families when representations come from
  families (the variants of one backbone are not independent points); no interval with fewer than
  ``MIN_INTERVAL`` (5) representations, or families: the record says "too few representations".
* :func:`ranking_stability` -- Kendall tau between the IIS rankings of the representations under
  different concept draws (mean and range over pairs of draws).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from .blocks import CorrelationParams
from ..params import block_values
from .scores import kendall_rows, pearson_rows, percentile_interval, validate_boot, paired

logger = logging.getLogger(__name__)

EXACT_MAX = 8
MIN_INTERVAL = 5
METHODS = ("pearson", "spearman", "kendall")
TOO_FEW = "too few representations"


def _coefficients(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Row-wise coefficients of (b, n) arrays."""
    return {
        "pearson": pearson_rows(x, y),
        "spearman": pearson_rows(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)),
        "kendall": kendall_rows(x, y),
    }


def _orderings(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if n <= EXACT_MAX:
        return np.array(list(itertools.permutations(range(n)))), True
    return np.argsort(rng.random((int(n_perm), n)), axis=1), False


def permutation_p(x: Sequence[float], y: Sequence[float], n_perm: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Two-sided permutation p-value of each coefficient (``|r_perm| >= |r|``), by method."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = xa.size
    perms, exact = _orderings(n, n_perm, np.random.default_rng(seed))
    obs = _coefficients(xa[None], ya[None])
    out = {}
    for start in range(0, len(perms), 50_000):
        part = perms[start : start + 50_000]
        coef = _coefficients(np.broadcast_to(xa, part.shape), ya[part])
        for m in METHODS:
            hits = np.abs(coef[m]) >= np.abs(obs[m][0]) - 1e-12
            out[m] = out.get(m, 0) + int(np.count_nonzero(hits))
    return {m: (out[m] / len(perms)) if exact else (1 + out[m]) / (1 + len(perms)) for m in METHODS}


def _clusters(n: int, families: Sequence[Any] | None) -> list[np.ndarray]:
    """Index groups resampled together: one per family; a representation without a family is its own."""
    if families is None:
        return [np.array([i]) for i in range(n)]
    groups: dict[Any, list[int]] = {}
    for i, f in enumerate(families):
        key = ("_alone", i) if f is None or (isinstance(f, float) and math.isnan(f)) or str(f) in ("", "nan", "None") else str(f)
        groups.setdefault(key, []).append(i)
    return [np.array(v) for v in groups.values()]


def cluster_resample(clusters: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap sample: as many clusters as there are, drawn with replacement, every member of each."""
    return np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), size=len(clusters))])


def cluster_bootstrap(
    x: np.ndarray, y: np.ndarray, clusters: list[np.ndarray], n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Replicates of each coefficient, resampling whole clusters with replacement (NaN: constant x or y)."""
    out = {m: np.full(n_boot, np.nan) for m in METHODS}
    for b in range(n_boot):
        idx = cluster_resample(clusters, rng)
        xb, yb = x[idx][None], y[idx][None]
        if np.ptp(xb) == 0 or np.ptp(yb) == 0:
            continue
        for m, v in _coefficients(xb, yb).items():
            out[m][b] = v[0]
    return out


def correlate_across(
    x: Sequence[float],
    y: Sequence[float],
    families: Sequence[Any] | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    ci: float | None = None,
) -> dict[str, Any]:
    """Correlation of paired values across representations, inference as the study allows.

    Returns ``{method: {"r", "p", "p_perm", "ci_low", "ci_high"}, "n", "n_clusters", "interval"}``;
    ``interval`` says how the interval was made: ``"bootstrap over representations"``, ``"bootstrap over
    families"`` (when some family holds more than one representation: whole families are resampled), or
    ``"too few representations"`` (fewer than 5 units to resample; ``ci_low`` / ``ci_high`` are NaN).
    ``n_boot``, ``seed``, ``ci`` left out: the ``correlation`` block's
    (:class:`~iis_study.core.scoring.blocks.CorrelationParams`).
    """
    n_boot, seed, ci = block_values(CorrelationParams, n_boot=n_boot, seed=seed, ci=ci)
    validate_boot(n_boot, ci)
    xa, ya = paired(x, y)
    n = int(xa.size)
    nan = {"r": math.nan, "p": math.nan, "p_perm": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        logger.warning("correlate: %d pairs%s; correlation undefined, returning NaN", n,
                       "" if n < 3 else " with constant x or y")
        return {**{m: dict(nan) for m in METHODS}, "n": n, "n_clusters": n, "interval": TOO_FEW}
    clusters = _clusters(n, families)
    by_family = any(len(c) > 1 for c in clusters)
    point = {"pearson": stats.pearsonr(xa, ya), "spearman": stats.spearmanr(xa, ya), "kendall": stats.kendalltau(xa, ya)}
    p_perm = permutation_p(xa, ya, n_perm=max(int(n_boot), 1000), seed=seed)
    if len(clusters) < MIN_INTERVAL:
        boot, interval = None, TOO_FEW
    else:
        boot = cluster_bootstrap(xa, ya, clusters, int(n_boot), np.random.default_rng(seed))
        interval = "bootstrap over families" if by_family else "bootstrap over representations"
    out: dict[str, Any] = {"n": n, "n_clusters": len(clusters), "interval": interval}
    for m, res in point.items():
        lo, hi = percentile_interval(boot[m], ci) if boot is not None else (math.nan, math.nan)
        out[m] = {"r": float(res[0]), "p": float(res[1]), "p_perm": float(p_perm[m]), "ci_low": lo, "ci_high": hi}
    return out


def ranking_stability(per_draw: np.ndarray) -> dict[str, Any]:
    """Kendall tau between the rankings of representations (rows) under every pair of concept draws
    (columns): ``{"kendall_tau_mean", "kendall_tau_min", "kendall_tau_max", "n_pairs", "n"}``; NaN with
    fewer than 2 draws or 3 representations."""
    a = np.asarray(per_draw, dtype=float)
    n, r = a.shape if a.ndim == 2 else (0, 0)
    taus = []
    if n >= 3:
        for i, j in itertools.combinations(range(r), 2):
            ok = np.isfinite(a[:, i]) & np.isfinite(a[:, j])
            if ok.sum() >= 3:
                taus.append(float(kendall_rows(a[ok, i][None], a[ok, j][None])[0]))
    taus = [t for t in taus if math.isfinite(t)]
    if not taus:
        return {"kendall_tau_mean": math.nan, "kendall_tau_min": math.nan, "kendall_tau_max": math.nan, "n_pairs": 0, "n": n}
    return {"kendall_tau_mean": float(np.mean(taus)), "kendall_tau_min": float(min(taus)),
            "kendall_tau_max": float(max(taus)), "n_pairs": len(taus), "n": n}
