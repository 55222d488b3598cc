"""The Inherent Interpretability Score and its statistics (METHOD §4 and §7).

* :func:`iis` -- trapezoid area under the accuracy-retention curve over the sparsity
  grid, *not* divided by the grid's span (heads matching the probe at every sparsity score 0.98 on the default
  grid; not a ceiling: a head that beats the probe on the test split has ARR > 1).
* :func:`accuracy_retention` / :func:`chance_corrected_retention` -- ``A(s) / A_std`` and
  ``(A(s) - 1/K) / (A_std - 1/K)``.
* :func:`score_sweep` -- IIS of a :class:`~iis_study.core.heads.SweepResult`: mean and
  std over seeds, bootstrap interval over test samples, chance-corrected IIS.
* :func:`correlate` -- Pearson / Spearman / Kendall correlation with bootstrap
  intervals over pairs (e.g. ``A_std`` against IIS across backbones, METHOD §6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from .blocks import CorrelationParams, ScoringParams
from ..heads.datatypes import SweepParams
from ..params import block_values

if TYPE_CHECKING:  # pragma: no cover
    from iis_study.core.heads import SweepResult

logger = logging.getLogger(__name__)

DEFAULT_SPARSITIES = SweepParams.sparsities  # the sweep block's grid
BOOT_CHUNK_ELEMS = 20_000_000  # bound on replicate-by-sample (or pair-by-pair) work arrays


# --------------------------------------------------------------------------- basic scores


def _validate_grid(sparsities: Sequence[float]) -> np.ndarray:
    s = np.asarray(sparsities, dtype=float)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sparsities must be a 1-D grid with at least 2 values, got {sparsities!r}")
    if not np.all(np.isfinite(s)) or np.any(np.diff(s) <= 0):
        raise ValueError(f"sparsities must be finite and strictly increasing, got {tuple(s)}")
    return s


def iis_along_last(s: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """Trapezoid rule along the last axis of ``arr`` over grid ``s`` (vectorised)."""
    return (np.diff(s) * (arr[..., 1:] + arr[..., :-1]) / 2.0).sum(-1)


def iis(sparsities: Sequence[float], arr: Sequence[float]) -> float:
    """Inherent Interpretability Score (METHOD §4).

    ``IIS = Σ_i (s_{i+1} - s_i) · (ARR(s_i) + ARR(s_{i+1})) / 2`` -- the trapezoid area
    under ``ARR`` over the grid, not divided by the grid's span.
    """
    s = _validate_grid(sparsities)
    a = np.asarray(arr, dtype=float)
    if a.shape != s.shape:
        raise ValueError(f"arr must have one value per sparsity ({s.size}), got shape {a.shape}")
    return float(iis_along_last(s, a))


def accuracy_retention(acc: np.ndarray, acc_std: float | np.ndarray) -> np.ndarray:
    """Accuracy retention ratio ``ARR(s) = A(s) / A_std`` (broadcasting)."""
    a = np.asarray(acc, dtype=float)
    std = np.asarray(acc_std, dtype=float)
    if np.any(std <= 0):
        raise ValueError(f"acc_std must be > 0, got {acc_std}")
    return a / std


def chance_corrected_retention(acc: np.ndarray, acc_std: float | np.ndarray, num_classes: int) -> np.ndarray:
    """Chance-corrected retention ``(A(s) - 1/K) / (A_std - 1/K)`` (METHOD §7).

    Where ``A_std <= 1/K`` (a probe no better than chance) the ratio is undefined:
    those entries are **NaN** and a warning is logged (no exception, so that bootstrap
    replicates and random-init controls do not abort a pipeline).
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    chance = 1.0 / int(num_classes)
    a = np.asarray(acc, dtype=float)
    std = np.broadcast_to(
        np.asarray(acc_std, dtype=float), np.broadcast_shapes(np.shape(a), np.shape(acc_std))
    )
    bad = std <= chance
    if np.any(bad):
        logger.warning(
            "chance_corrected_retention: A_std <= 1/K (= %.4g) for %d value(s); returning NaN there",
            chance,
            int(np.count_nonzero(bad)),
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - chance) / (std - chance)
    return np.where(bad, np.nan, out)


# --------------------------------------------------------------------------- sweep scores


def percentile_interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def validate_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < ci < 1.0):
        raise ValueError(f"ci must lie in (0, 1), got {ci}")


def iis_per_seed(acc: np.ndarray, s: np.ndarray) -> np.ndarray:
    """IIS per seed from accuracies (..., n_seeds, 1 + P), column 0 = probe."""
    with np.errstate(divide="ignore", invalid="ignore"):
        arr = acc[..., 1:] / acc[..., :1]
    return iis_along_last(s, arr)


def _bootstrap_iis(correct: np.ndarray, s: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap over test samples of the seed-mean IIS.

    ``correct`` is (n_seeds, 1 + P, N). Each replicate draws N test indices with
    replacement (as multinomial counts, shared by all seeds and heads) and recomputes
    every accuracy as ``counts @ correct / N``.
    """
    n_seeds, n_heads, n = correct.shape
    flat = correct.reshape(n_seeds * n_heads, n).astype(np.float64).T  # (N, S*H)
    chunk = max(1, BOOT_CHUNK_ELEMS // max(n, 1))
    out = np.empty(n_boot)
    probs = np.full(n, 1.0 / n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        counts = rng.multinomial(n, probs, size=stop - start).astype(np.float64)  # (b, N)
        acc = (counts @ flat / n).reshape(stop - start, n_seeds, n_heads)
        out[start:stop] = iis_per_seed(acc, s).mean(-1)
    return out


def score_sweep(
    result: SweepResult, n_boot: int | None = None, seed: int | None = None, ci: float | None = None
) -> tuple[dict, pd.DataFrame]:
    """IIS of a sweep: point estimates over seeds and a bootstrap interval over test samples.

    Returns ``(summary, curve)``. ``summary`` holds ``accuracy_linear_probe`` (mean over
    seeds of the selected probe's test accuracy) and its ``_std``; ``iis`` (mean over
    seeds of per-seed IIS) and ``iis_std`` (sample std over seeds, ddof=1; NaN for a
    single seed); ``iis_ci_low`` / ``iis_ci_high`` (percentile bootstrap over test
    samples of the seed-mean IIS, ``n_boot`` replicates, level ``ci``) and ``iis_se`` (the replicates' sd: test-image noise of the seed-mean only, like the interval; with several
    Adam seeds the between-seed spread is ``iis_std`` beside it and is not in ``iis_se``);
    ``iis_chance_corrected`` (mean over seeds; NaN where ``A_std <= 1/K``) and its
    ``_std``; ``n_seeds``, ``n_test``, ``n_boot``, ``ci``. ``curve`` has one row per
    seed x sparsity: seed, sparsity, accuracy, arr, arr_chance_corrected. ``n_boot``, ``seed``, ``ci``
    left out: the ``scoring`` block's (:class:`~iis_study.core.scoring.blocks.ScoringParams`).
    """
    n_boot, seed, ci = block_values(ScoringParams, n_boot=n_boot, seed=seed, ci=ci)
    validate_boot(n_boot, ci)
    correct = np.asarray(result.test_correct, dtype=bool)
    sparsities = np.asarray(result.config.sparsities, dtype=float)
    seeds = list(result.seeds)
    if correct.ndim != 3 or correct.shape[:2] != (len(seeds), 1 + sparsities.size):
        raise ValueError(
            "result.test_correct must have shape (n_seeds, 1 + n_sparsities, N_test) = "
            f"({len(seeds)}, {1 + sparsities.size}, N), got {correct.shape}"
        )
    if correct.shape[2] < 1:
        raise ValueError("result.test_correct has no test samples")
    s = _validate_grid(sparsities)
    acc = correct.mean(-1)  # (S, 1 + P)
    probe = acc[:, 0]
    arr = accuracy_retention(acc[:, 1:], probe[:, None]) if np.all(probe > 0) else _safe_ratio(acc)
    arr_cc = chance_corrected_retention(acc[:, 1:], probe[:, None], result.num_classes)
    iis_seed = iis_along_last(s, arr)
    iis_cc_seed = iis_along_last(s, arr_cc)
    boot = _bootstrap_iis(correct, s, int(n_boot), np.random.default_rng(seed))
    lo, hi = percentile_interval(boot, ci)
    ddof = 1 if len(seeds) > 1 else 0
    summary = {
        "accuracy_linear_probe": float(probe.mean()),
        "accuracy_linear_probe_std": float(probe.std(ddof=ddof)) if len(seeds) > 1 else math.nan,
        "iis": float(iis_seed.mean()),
        "iis_std": float(iis_seed.std(ddof=ddof)) if len(seeds) > 1 else math.nan,
        "iis_ci_low": lo,
        "iis_ci_high": hi,
        "iis_se": float(np.std(boot[np.isfinite(boot)], ddof=1)) if np.isfinite(boot).sum() > 1 else math.nan,
        "iis_chance_corrected": float(iis_cc_seed.mean()),
        "iis_chance_corrected_std": float(iis_cc_seed.std(ddof=ddof)) if len(seeds) > 1 else math.nan,
        "n_seeds": len(seeds),
        "n_test": int(correct.shape[2]),
        "n_boot": int(n_boot),
        "ci": float(ci),
    }
    curve = curve_table(acc, s, seeds, result.num_classes, arr=arr, arr_cc=arr_cc)
    return summary, curve


def curve_table(
    acc: np.ndarray, sparsities: np.ndarray, seeds: Sequence[int], num_classes: int,
    arr: np.ndarray | None = None, arr_cc: np.ndarray | None = None,
) -> pd.DataFrame:
    """One concept set's curve: a row per seed x sparsity (``seed``, ``sparsity``, ``accuracy``, ``arr``,
    ``arr_chance_corrected``) from its (seeds, 1 + P) test accuracies, column 0 the probe. Integrating ``arr``
    over the sparsities (the trapezoid rule) and averaging over seeds gives the set's IIS."""
    s = np.asarray(sparsities, dtype=float)
    if arr is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            arr = acc[:, 1:] / acc[:, :1]
    if arr_cc is None:
        arr_cc = chance_corrected_retention(acc[:, 1:], acc[:, :1], num_classes)
    return pd.DataFrame(
        {
            "seed": np.repeat(np.asarray(seeds, dtype=int), s.size),
            "sparsity": np.tile(s, len(seeds)),
            "accuracy": acc[:, 1:].reshape(-1),
            "arr": arr.reshape(-1),
            "arr_chance_corrected": arr_cc.reshape(-1),
        }
    )


def _safe_ratio(acc: np.ndarray) -> np.ndarray:
    logger.warning("score_sweep: a probe has test accuracy 0; its ARR is NaN/inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc[:, 1:] / acc[:, :1]


# --------------------------------------------------------------------------- correlation


def _nan_result(n: int) -> dict:
    nan = {"r": math.nan, "p": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    return {"pearson": dict(nan), "spearman": dict(nan), "kendall": dict(nan), "n": n}


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of (b, n) arrays; NaN for constant rows."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (xc * yc).sum(-1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Kendall tau-b of (b, n) arrays (as ``scipy.stats.kendalltau``); NaN if undefined."""
    n = x.shape[-1]
    iu, ju = np.triu_indices(n, k=1)
    dx = np.sign(x[:, ju] - x[:, iu])
    dy = np.sign(y[:, ju] - y[:, iu])
    s = (dx * dy).sum(-1)
    n0 = iu.size
    tx = n0 - np.count_nonzero(dx == 0, axis=-1)
    ty = n0 - np.count_nonzero(dy == 0, axis=-1)
    den = np.sqrt(tx.astype(float) * ty.astype(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = s / den
    return np.where(den > 0, np.clip(tau, -1.0, 1.0), np.nan)


def _bootstrap_correlations(
    x: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Bootstrap replicates (resampled pairs) of the three coefficients; NaN marks
    degenerate replicates (constant x or y), which are skipped downstream."""
    n = x.size
    pairs = n * (n - 1) // 2
    chunk = max(1, BOOT_CHUNK_ELEMS // max(pairs, n, 1))
    out = {k: np.empty(n_boot) for k in ("pearson", "spearman", "kendall")}
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        xb, yb = x[idx], y[idx]
        degenerate = (np.ptp(xb, axis=-1) == 0) | (np.ptp(yb, axis=-1) == 0)
        out["pearson"][start:stop] = np.where(degenerate, np.nan, pearson_rows(xb, yb))
        rx, ry = stats.rankdata(xb, axis=-1), stats.rankdata(yb, axis=-1)
        out["spearman"][start:stop] = np.where(degenerate, np.nan, pearson_rows(rx, ry))
        out["kendall"][start:stop] = np.where(degenerate, np.nan, kendall_rows(xb, yb))
    return out


def paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as finite 1-D float arrays of one length (else a ``ValueError``)."""
    xa, ya = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if xa.size != ya.size:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("x and y must be finite")
    return xa, ya


def correlate(
    x: Sequence[float], y: Sequence[float], n_boot: int | None = None, seed: int | None = None,
    ci: float | None = None,
) -> dict:
    """Pearson, Spearman and Kendall (tau-b) correlation of paired values, with
    percentile bootstrap intervals over the pairs (resampled with replacement;
    replicates with constant x or y are skipped).

    Returns ``{"pearson": {"r", "p", "ci_low", "ci_high"}, "spearman": {...},
    "kendall": {...}, "n": n}``. With fewer than 3 pairs, or constant x or y, every
    value is NaN and a warning is logged (no exception). ``n_boot``, ``seed``, ``ci`` left out: the
    ``correlation`` block's (:class:`~iis_study.core.scoring.blocks.CorrelationParams`).
    """
    n_boot, seed, ci = block_values(CorrelationParams, n_boot=n_boot, seed=seed, ci=ci)
    validate_boot(n_boot, ci)
    xa, ya = paired(x, y)
    n = int(xa.size)
    if n < 3:
        logger.warning("correlate: need at least 3 pairs, got %d; returning NaN", n)
        return _nan_result(n)
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        logger.warning("correlate: x or y is constant; correlation undefined, returning NaN")
        return _nan_result(n)
    point = {
        "pearson": stats.pearsonr(xa, ya),
        "spearman": stats.spearmanr(xa, ya),
        "kendall": stats.kendalltau(xa, ya),
    }
    boot = _bootstrap_correlations(xa, ya, int(n_boot), np.random.default_rng(seed))
    out: dict = {"n": n}
    for name, res in point.items():
        lo, hi = percentile_interval(boot[name], ci)
        out[name] = {"r": float(res[0]), "p": float(res[1]), "ci_low": lo, "ci_high": hi}
    return out


def _plain(value: object) -> object:
    """A JSON-ready scalar: bools and integers stay what they are (steps, counts), numbers become floats."""
    if isinstance(value, bool | int):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
        return value if isinstance(value, bool | int) else float(value)
    return float(value) if hasattr(value, "__float__") else value


def plain_scores(scores: dict) -> dict:
    """A scores record with JSON-ready values (:func:`_plain` for each)."""
    return {k: _plain(v) for k, v in scores.items()}
