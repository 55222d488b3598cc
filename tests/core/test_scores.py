"""Tests for iis_study.core.scoring.scores (METHOD §4, §7)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from iis_study.core.heads import SweepParams, SweepResult
from iis_study.core.scoring.scores import (
    DEFAULT_SPARSITIES,
    kendall_rows,
    pearson_rows,
    accuracy_retention,
    chance_corrected_retention,
    correlate,
    iis,
    score_sweep,
)

# --------------------------------------------------------------------------- iis


def test_iis_perfect_retention_is_grid_span():
    # ARR = 1 everywhere: Σ (s_{i+1} - s_i) * (1 + 1) / 2 = 0.98 - 0.0 = 0.98 (not divided by span)
    assert iis(DEFAULT_SPARSITIES, [1.0] * 8) == pytest.approx(0.98, abs=1e-12)


def test_iis_hand_computed_default_grid():
    arr = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2]
    # widths: 0.1, 0.2, 0.2, 0.2, 0.2, 0.05, 0.03
    # 0.1*(1.0+0.9)/2 = 0.095
    # 0.2*(0.9+0.8)/2 = 0.17
    # 0.2*(0.8+0.7)/2 = 0.15
    # 0.2*(0.7+0.6)/2 = 0.13
    # 0.2*(0.6+0.5)/2 = 0.11
    # 0.05*(0.5+0.4)/2 = 0.0225
    # 0.03*(0.4+0.2)/2 = 0.009
    expected = 0.095 + 0.17 + 0.15 + 0.13 + 0.11 + 0.0225 + 0.009  # = 0.6865
    assert iis(DEFAULT_SPARSITIES, arr) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.6865)


def test_iis_custom_grid():
    # grid (0, 0.5, 0.6): 0.5*(1+0.5)/2 + 0.1*(0.5+0)/2 = 0.375 + 0.025 = 0.4
    assert iis([0.0, 0.5, 0.6], [1.0, 0.5, 0.0]) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize(
    "grid, arr, match",
    [
        ([0.0, 0.5], [1.0], "one value per sparsity"),
        ([0.5, 0.1], [1, 1], "strictly increasing"),
        ([0.1], [1], "at least 2"),
    ],
)
def test_iis_rejects_bad_input(grid, arr, match):
    with pytest.raises(ValueError, match=match):
        iis(grid, arr)


# --------------------------------------------------------------------------- retention


def test_accuracy_retention_and_chance_corrected_by_hand():
    acc = np.array([0.8, 0.55, 0.1])
    np.testing.assert_allclose(accuracy_retention(acc, 0.8), [1.0, 0.6875, 0.125])
    # K = 10, chance 0.1: (0.8-0.1)/(0.8-0.1) = 1; (0.55-0.1)/0.7 = 0.642857...; (0.1-0.1)/0.7 = 0
    np.testing.assert_allclose(chance_corrected_retention(acc, 0.8, 10), [1.0, 0.45 / 0.7, 0.0])


def test_chance_corrected_nan_below_chance(caplog):
    with caplog.at_level(logging.WARNING):
        out = chance_corrected_retention(np.array([0.3, 0.2]), 0.25, num_classes=4)
    assert np.all(np.isnan(out))
    assert "A_std <= 1/K" in caplog.text


def test_accuracy_retention_rejects_zero_std():
    with pytest.raises(ValueError, match="acc_std"):
        accuracy_retention(np.array([0.5]), 0.0)


# --------------------------------------------------------------------------- score_sweep


def _hand_result(correct: np.ndarray, sparsities=(0.0, 0.5, 0.9), seeds=(0, 1), k=4) -> SweepResult:
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=sparsities, learning_rates=(1e-2,), seeds=seeds)
    return SweepResult(
        config=cfg,
        num_classes=k,
        m=10,
        table=pd.DataFrame(),
        selected=pd.DataFrame(),
        test_correct=correct,
        state={},
    )


def _correct_from_counts(counts, n=10):
    """Bool (S, H, n) with the first counts[s][h] samples correct."""
    counts = np.asarray(counts)
    return np.arange(n)[None, None, :] < counts[..., None]


def test_score_sweep_by_hand():
    # seed 0: probe 8/10, interp 8/10, 6/10, 4/10 ; seed 1: probe 10/10, interp 10/10, 5/10, 0/10
    correct = _correct_from_counts([[8, 8, 6, 4], [10, 10, 5, 0]])
    summary, curve = score_sweep(_hand_result(correct), n_boot=300, seed=1)
    # seed 0 ARR: 1, 0.75, 0.5 -> IIS = 0.5*(1+0.75)/2 + 0.4*(0.75+0.5)/2 = 0.4375 + 0.25 = 0.6875
    # seed 1 ARR: 1, 0.5, 0.0 -> IIS = 0.5*(1+0.5)/2 + 0.4*(0.5+0)/2 = 0.375 + 0.1 = 0.475
    assert summary["iis"] == pytest.approx((0.6875 + 0.475) / 2)
    assert summary["iis_std"] == pytest.approx(np.std([0.6875, 0.475], ddof=1))
    assert summary["accuracy_linear_probe"] == pytest.approx(0.9)
    # chance-corrected, K = 4 (chance 0.25):
    # seed 0: (0.8-.25)/(0.8-.25)=1, (0.6-.25)/0.55=0.63636, (0.4-.25)/0.55=0.27273
    #   IIS_cc = 0.5*(1+0.63636)/2 + 0.4*(0.63636+0.27273)/2
    # seed 1: 1, (0.5-.25)/0.75=1/3, (0-.25)/0.75=-1/3 -> 0.5*(4/3)/2 + 0.4*0/2 = 1/3
    cc0 = 0.5 * (1 + 0.35 / 0.55) / 2 + 0.4 * (0.35 / 0.55 + 0.15 / 0.55) / 2
    cc1 = 0.5 * (1 + 1 / 3) / 2 + 0.4 * (1 / 3 - 1 / 3) / 2
    assert summary["iis_chance_corrected"] == pytest.approx((cc0 + cc1) / 2)
    assert summary["n_seeds"] == 2
    assert summary["iis_ci_low"] <= summary["iis"] <= summary["iis_ci_high"]
    assert summary["iis_ci_low"] < summary["iis_ci_high"]
    assert list(curve.columns) == ["seed", "sparsity", "accuracy", "arr", "arr_chance_corrected"]
    assert len(curve) == 2 * 3
    np.testing.assert_allclose(curve["arr"], [1.0, 0.75, 0.5, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(curve["accuracy"], [0.8, 0.6, 0.4, 1.0, 0.5, 0.0])


def test_score_sweep_bootstrap_is_deterministic_and_degenerate_when_all_equal():
    # Every sample equally correct for all heads -> every resample gives the same IIS.
    correct = np.ones((1, 4, 50), dtype=bool)
    summary, _ = score_sweep(_hand_result(correct, seeds=(0,)), n_boot=200)
    assert summary["iis"] == pytest.approx(0.9)
    assert summary["iis_ci_low"] == pytest.approx(0.9) and summary["iis_ci_high"] == pytest.approx(0.9)
    assert math.isnan(summary["iis_std"])  # one seed: sample std undefined
    rng = np.random.default_rng(0)
    correct = rng.random((2, 4, 80)) < 0.7
    a, _ = score_sweep(_hand_result(correct), n_boot=100, seed=3)
    b, _ = score_sweep(_hand_result(correct), n_boot=100, seed=3)
    assert a == b


def test_bootstrap_interval_covers_the_true_iis_at_its_level():
    """Coverage on a case with a known answer: independent Bernoulli correctness with known
    accuracies, so the population IIS is exact. Over 1,000 simulated test sets the 95 % interval
    must contain it 92.5-97.5 % of the time (binomial sd 0.7 point; an interval at the wrong
    level, e.g. alpha not halved, covers ~90 %; seeds fixed, so the test is deterministic)."""
    p = np.array([0.8, 0.78, 0.74, 0.66, 0.5])  # probe, then A(s) at s = 0, 0.5, 0.9, 0.95
    sparsities = (0.0, 0.5, 0.9, 0.95)
    arr = p[1:] / p[0]
    s = np.asarray(sparsities)
    truth = float(np.sum(np.diff(s) * (arr[1:] + arr[:-1]) / 2))
    rng = np.random.default_rng(12345)
    hits, reps = 0, 1000
    for r in range(reps):
        correct = rng.random((1, len(p), 400)) < p[None, :, None]
        summary, _ = score_sweep(_hand_result(correct, sparsities=sparsities, seeds=(0,)), n_boot=200, seed=r)
        hits += summary["iis_ci_low"] <= truth <= summary["iis_ci_high"]
    assert 0.925 <= hits / reps <= 0.975, hits / reps


def test_bootstrap_resamples_test_images_jointly_across_seeds_and_heads():
    """One draw of test images serves every seed and head: when every head of every seed is
    right on exactly the same images, every replicate has ARR = 1 and the interval is a point,
    however the images are drawn (resampling heads or seeds separately would spread it)."""
    rng = np.random.default_rng(0)
    pattern = rng.random(120) < 0.6
    correct = np.broadcast_to(pattern, (3, 4, 120)).copy()
    summary, _ = score_sweep(_hand_result(correct, seeds=(0, 1, 2)), n_boot=300, seed=1)
    assert summary["iis"] == pytest.approx(0.9)
    assert summary["iis_ci_low"] == pytest.approx(0.9, abs=1e-12)
    assert summary["iis_ci_high"] == pytest.approx(0.9, abs=1e-12)


def test_score_sweep_rejects_wrong_shape():
    with pytest.raises(ValueError, match="test_correct"):
        score_sweep(_hand_result(np.ones((2, 3, 5), dtype=bool)))


# --------------------------------------------------------------------------- correlate


def test_correlate_monotone_nonlinear():
    x = np.arange(1.0, 9.0)
    y = np.exp(x)  # perfectly monotone, far from linear
    out = correlate(x, y, n_boot=500)
    assert out["n"] == 8
    assert out["spearman"]["r"] == pytest.approx(1.0)
    assert out["kendall"]["r"] == pytest.approx(1.0)
    assert out["pearson"]["r"] < 0.95
    assert out["spearman"]["ci_low"] == pytest.approx(1.0) and out["kendall"]["ci_high"] == pytest.approx(1.0)
    assert out["pearson"]["ci_low"] <= out["pearson"]["r"] <= out["pearson"]["ci_high"]


def test_correlate_too_few_pairs_warns(caplog):
    with caplog.at_level(logging.WARNING):
        out = correlate([1.0, 2.0], [3.0, 4.0])
    assert out["n"] == 2
    for name in ("pearson", "spearman", "kendall"):
        assert all(math.isnan(v) for v in out[name].values())
    assert "at least 3" in caplog.text


def test_vectorised_coefficients_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(20, 9)).astype(float)
    y = x + rng.integers(0, 3, size=(20, 9))
    for i in range(20):
        if np.ptp(x[i]) == 0 or np.ptp(y[i]) == 0:
            continue
        assert pearson_rows(x[i : i + 1], y[i : i + 1])[0] == pytest.approx(stats.pearsonr(x[i], y[i])[0])
        assert kendall_rows(x[i : i + 1], y[i : i + 1])[0] == pytest.approx(stats.kendalltau(x[i], y[i])[0])


def test_correlate_point_estimates_are_scipys():
    rng = np.random.default_rng(1)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    out = correlate(x, y, n_boot=200, seed=5)
    assert out["pearson"]["r"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert out["pearson"]["p"] == pytest.approx(stats.pearsonr(x, y)[1])
    assert out["spearman"]["r"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert out["kendall"]["p"] == pytest.approx(stats.kendalltau(x, y)[1])
    for name in ("pearson", "spearman", "kendall"):
        assert out[name]["ci_low"] < out[name]["r"] < out[name]["ci_high"]
