"""Property tests (hypothesis) of the score (METHOD §4, §7) and of the sparsity mask (METHOD §3).

Every test runs with ``derandomize=True`` and no example database, so every run tries the same
examples (deterministic, nothing learnt from earlier failures).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from iis_study.core.heads import SweepParams, SweepResult, n_dropped, sparsify
from iis_study.core.scoring.scores import (
    DEFAULT_SPARSITIES,
    accuracy_retention,
    chance_corrected_retention,
    iis,
    score_sweep,
)

PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
TOL = 1e-9

# --------------------------------------------------------------------------- strategies


@st.composite
def grids(draw) -> tuple[float, ...]:
    """A strictly increasing sparsity grid in [0, 1) with 2..12 decimal points (the default included)."""
    if draw(st.booleans()):
        return DEFAULT_SPARSITIES
    pct = draw(st.lists(st.integers(0, 99), min_size=2, max_size=12, unique=True))
    return tuple(p / 100 for p in sorted(pct))


@st.composite
def curves(draw) -> tuple[tuple[float, ...], float, np.ndarray]:
    """A grid, a probe accuracy ``A_std`` in (0, 1] and accuracies ``A(s) <= A_std``."""
    grid = draw(grids())
    a_std = draw(st.floats(0.01, 1.0))
    fractions = draw(st.lists(st.floats(0.0, 1.0), min_size=len(grid), max_size=len(grid)))
    return grid, a_std, a_std * np.asarray(fractions)


def _trapezoid_weights(grid: tuple[float, ...]) -> np.ndarray:
    """d IIS / d ARR(s_i): half the width of the intervals on either side of s_i."""
    s = np.asarray(grid)
    w = np.zeros_like(s)
    w[:-1] += np.diff(s) / 2
    w[1:] += np.diff(s) / 2
    return w


# --------------------------------------------------------------------------- the score


@PROPERTY
@given(curves())
def test_iis_lies_between_zero_and_grid_span(curve):
    grid, a_std, acc = curve
    score = iis(grid, accuracy_retention(acc, a_std))
    assert -TOL <= score <= (grid[-1] - grid[0]) + TOL


@PROPERTY
@given(grids(), st.floats(0.0, 1.0))
def test_constant_retention_scores_its_value_times_the_span(grid, c):
    assert iis(grid, np.full(len(grid), c)) == pytest.approx(c * (grid[-1] - grid[0]), abs=1e-12)


@PROPERTY
@given(curves(), st.data())
def test_iis_increases_in_each_accuracy_by_its_trapezoid_weight(curve, data):
    grid, a_std, acc = curve
    i = data.draw(st.integers(0, len(grid) - 1), label="index")
    delta = data.draw(st.floats(1e-6, 1.0), label="delta")
    more = acc.copy()
    more[i] += delta
    gain = iis(grid, accuracy_retention(more, a_std)) - iis(grid, accuracy_retention(acc, a_std))
    expected = delta / a_std * _trapezoid_weights(grid)[i]
    assert gain == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert gain >= 0  # monotone, strictly where the weight is positive (always, on a strict grid)


@PROPERTY
@given(curves(), st.floats(1e-6, 1.0))
def test_iis_decreases_when_the_probe_gets_better(curve, delta):
    grid, a_std, acc = curve
    before = iis(grid, accuracy_retention(acc, a_std))
    after = iis(grid, accuracy_retention(acc, a_std + delta))
    assert after <= before + TOL


@PROPERTY
@given(curves(), st.integers(2, 1000))
def test_chance_correction_never_raises_retention(curve, k):
    """``(A - 1/K) / (A_std - 1/K) <= A / A_std`` whenever ``A <= A_std`` and ``A_std > 1/K``."""
    _, a_std, acc = curve
    assume(a_std > 1.0 / k + 1e-6)
    arr = accuracy_retention(acc, a_std)
    arr_cc = chance_corrected_retention(acc, a_std, k)
    assert np.all(arr_cc <= arr + TOL)
    np.testing.assert_allclose(chance_corrected_retention(np.array([a_std]), a_std, k), [1.0])


@st.composite
def sweep_outcomes(draw) -> tuple[SweepParams, np.ndarray]:
    """Per-sample correctness (seeds, 1 + P, N) where no head beats its seed's probe."""
    grid = draw(grids())
    n_seeds = draw(st.integers(1, 3))
    n = draw(st.integers(4, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    correct = np.zeros((n_seeds, 1 + len(grid), n), dtype=bool)
    for s in range(n_seeds):
        n_probe = int(rng.integers(1, n + 1))
        correct[s, 0, rng.permutation(n)[:n_probe]] = True
        for h in range(1, 1 + len(grid)):  # any samples, at most as many as the probe got right
            correct[s, h, rng.permutation(n)[: int(rng.integers(0, n_probe + 1))]] = True
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=grid, learning_rates=(0.01,), seeds=tuple(range(n_seeds)), epochs=1)
    return cfg, correct


@PROPERTY
@given(sweep_outcomes())
def test_score_sweep_is_the_seed_mean_of_per_seed_iis_and_within_span(outcome):
    cfg, correct = outcome
    result = SweepResult(cfg, num_classes=10, m=8, table=pd.DataFrame(), selected=pd.DataFrame(),
                         test_correct=correct, state={})
    summary, curve = score_sweep(result, n_boot=20, seed=0)
    acc = correct.mean(-1)
    per_seed = [iis(cfg.sparsities, acc[s, 1:] / acc[s, 0]) for s in range(acc.shape[0])]
    assert summary["iis"] == pytest.approx(float(np.mean(per_seed)), abs=1e-12)
    assert -TOL <= summary["iis"] <= cfg.sparsities[-1] - cfg.sparsities[0] + TOL
    assert summary["iis_ci_low"] <= summary["iis_ci_high"]
    assert len(curve) == acc.shape[0] * len(cfg.sparsities)


# --------------------------------------------------------------------------- the mask


decimal_sparsities = st.one_of(
    st.sampled_from(DEFAULT_SPARSITIES),
    st.integers(0, 999).map(lambda p: p / 1000),
)


@PROPERTY
@given(decimal_sparsities, st.integers(1, 2000))
def test_n_dropped_is_floor_of_the_decimal_product(s, m):
    k = n_dropped(s, m)
    assert k == math.floor(Fraction(repr(s)) * m)
    assert 0 <= k < m  # s < 1 always keeps at least one concept


@PROPERTY
@given(st.lists(decimal_sparsities, min_size=2, max_size=2), st.integers(1, 2000))
def test_n_dropped_is_monotone_in_s(pair, m):
    lo, hi = sorted(pair)
    assert n_dropped(lo, m) <= n_dropped(hi, m)


@st.composite
def activations(draw) -> tuple[torch.Tensor, int]:
    """(rows, M) activations with many exact ties in |a| (no zeros, so kept entries are visible)."""
    m = draw(st.integers(1, 64))
    rows = draw(st.integers(1, 5))
    values = draw(
        st.lists(st.integers(1, 4), min_size=rows * m, max_size=rows * m)
        if draw(st.booleans())
        else st.lists(st.floats(0.01, 100.0), min_size=rows * m, max_size=rows * m)
    )
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=rows * m, max_size=rows * m))
    a = torch.tensor(np.asarray(values, dtype=np.float32) * np.asarray(signs, dtype=np.float32))
    return a.reshape(rows, m), m


@PROPERTY
@given(activations(), decimal_sparsities)
def test_mask_keeps_exactly_m_minus_k_largest_unchanged(act, s):
    a, m = act
    k = n_dropped(s, m)
    out = sparsify(a, k)
    kept = out != 0
    assert torch.equal(kept.sum(-1), torch.full((a.shape[0],), m - k))
    assert torch.equal(out[kept], a[kept])  # kept values are not shifted
    mag = a.abs()
    for r in range(a.shape[0]):  # every kept |a| >= every dropped |a|
        if 0 < k < m:
            assert mag[r][kept[r]].min() >= mag[r][~kept[r]].max()


@PROPERTY
@given(activations(), st.lists(decimal_sparsities, min_size=1, max_size=4))
def test_per_head_k_equals_one_k_at_a_time(act, ss):
    a, m = act
    stacked = a.expand(len(ss), *a.shape).contiguous()
    ks = torch.tensor([n_dropped(s, m) for s in ss])
    out = sparsify(stacked, ks)
    for h, k in enumerate(ks.tolist()):
        assert torch.equal(out[h], sparsify(a, k))
