"""The budget rule and the convergence checks (METHOD §4, "Budget and convergence")."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from iis_study.core.scoring.convergence import convergence_report, curve_gains, reference_probe, selection_gains
from iis_study.core.heads import ConceptSpace, Split, SweepParams, n_dropped, sweep


def test_budget_plan_adapts_the_batch_and_spreads_the_decay() -> None:
    cfg = SweepParams(steps=4000, epochs=30, batch_size=1024, min_batches_per_epoch=16, gamma=0.99)
    small = cfg.plan(1079)  # the default study
    assert (small.batch_size, small.steps_per_epoch, small.epochs) == (68, 16, 250)
    assert small.steps == 4000
    assert small.gamma ** small.epochs == pytest.approx(0.99**30)  # the authors' total decay, spread out
    big = cfg.plan(1_281_167)  # ImageNet: the authors' batch and 30 epochs (~37,500 steps) already suffice
    assert (big.batch_size, big.epochs, big.gamma) == (1024, 30, 0.99)
    assert big.steps == 30 * math.ceil(1_281_167 / 1024)
    tiny = SweepParams(steps=1, epochs=3, batch_size=64, min_batches_per_epoch=1).plan(50)
    assert (tiny.batch_size, tiny.epochs, tiny.gamma) == (50, 3, 0.99)
    with pytest.raises(ValueError, match="sweep.steps"):
        SweepParams(steps=0).validate()
    with pytest.raises(ValueError, match="min_batches_per_epoch"):
        SweepParams(min_batches_per_epoch=0).validate()


def _blobs(n: int, d: int, k: int, seed: int, scale: float = 1.0, offset: float = 0.0):
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(1234)) * 2.0  # shared by the splits
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g) * 1.5
    return (x * scale + offset).float(), y


def test_reference_probe_matches_an_independent_fit() -> None:
    """Against scikit-learn's lbfgs logistic regression at the same C (written independently)."""
    from sklearn.linear_model import LogisticRegression

    tr, va, te = _blobs(300, 8, 3, 0), _blobs(200, 8, 3, 1), _blobs(200, 8, 3, 2)
    ref = reference_probe(tr, va, te, num_classes=3, cs=(1.0,))
    sk = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(tr[0].numpy(), tr[1].numpy())
    assert ref.val_acc == pytest.approx(sk.score(va[0].numpy(), va[1].numpy()), abs=1 / 200)
    assert ref.test_acc == pytest.approx(sk.score(te[0].numpy(), te[1].numpy()), abs=1 / 200)
    assert ref.converged and ref.c == 1.0


def _history(curves: dict[tuple, list[float]]) -> pd.DataFrame:
    rows = []
    for (head, seed, sp, lr), vals in curves.items():
        for e, v in enumerate(vals, start=1):
            rows.append({"head": head, "seed": seed, "sparsity": sp, "lr": lr, "epoch": e, "val_acc": v, "test_acc": v})
    return pd.DataFrame(rows)


def test_curve_gains_flags_a_rising_curve() -> None:
    flat = [0.5, 0.7, 0.8, 0.8, 0.79, 0.8, 0.8, 0.8, 0.8, 0.8]
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
    h = _history({("probe", 0, np.nan, 0.1): flat, ("interp", 0, 0.5, 0.1): rising})
    g = curve_gains(h).set_index("head")
    assert g.loc["probe", "gain"] == pytest.approx(0.0) and g.loc["probe", "peak_gain"] == pytest.approx(0.0)
    # the level of the last fifth (epochs 9-10) minus the level of the fifth before (epochs 7-8)
    assert g.loc["interp", "gain"] == pytest.approx((0.85 + 0.9) / 2 - (0.7 + 0.8) / 2)
    assert g.loc["interp", "peak_gain"] == pytest.approx(0.9 - 0.8)  # best of the last 2 minus best of the first 8


def test_flatness_is_judged_on_the_selected_accuracy_not_on_one_head() -> None:
    """What the score reports is the best val accuracy over the learning-rate grid: it is flat when a
    late spike of one learning rate barely beats what another reached early, and rising when the best
    learning rate still climbs; a head's own noisy curve is not the test."""
    g = np.random.default_rng(0)
    early = list(np.minimum(0.43, np.linspace(0.30, 0.60, 250)) + 0.002 * g.standard_normal(250))  # 0.43 from epoch 110
    spiky = list(0.40 + 0.005 * g.standard_normal(250))
    spiky[240] = 0.434  # a spike in the last fifth, 3 points above its own curve
    climb = list(np.linspace(0.38, 0.44, 250))  # +1.2 points per fifth, the best lr of sparsity 0.5
    flat_other = [0.41] * 250
    h = _history({
        ("probe", 0, np.nan, 0.01): early, ("probe", 0, np.nan, 0.1): spiky,
        ("interp", 0, 0.5, 0.01): climb, ("interp", 0, 0.5, 0.1): flat_other,
    })
    heads = curve_gains(h).set_index(["head", "lr"])
    assert heads.loc[("probe", 0.1), "peak_gain"] > 0.02  # the spiky head's own best rose late ...
    sel = selection_gains(h).set_index("head")["gain"]
    assert 0.0 < sel["probe"] <= 0.005  # ... but the selected accuracy barely moved
    assert sel["interp"] > 0.01
    chosen = pd.DataFrame([{"head": "probe", "seed": 0, "sparsity": np.nan, "lr": 0.1, "val_acc": 0.434},
                           {"head": "interp", "seed": 0, "sparsity": 0.5, "lr": 0.01, "val_acc": 0.44}])
    rep = convergence_report(chosen, h, {"val_acc": 0.43, "test_acc": 0.43, "c": 1.0})
    assert rep["probe_converged"] and not rep["heads_converged"]
    assert rep["max_gain_selected"] == pytest.approx(sel["interp"])
    assert rep["n_rising"] == 1  # the climbing head's level rose; no other head's did


def test_convergence_report_on_a_converged_and_an_unconverged_case() -> None:
    h = _history({("probe", 0, np.nan, 0.1): [0.5, 0.8, 0.8, 0.8, 0.8], ("interp", 0, 0.5, 0.1): [0.6] * 5})
    sel = pd.DataFrame([{"head": "probe", "seed": 0, "sparsity": np.nan, "lr": 0.1, "val_acc": 0.8},
                        {"head": "interp", "seed": 0, "sparsity": 0.5, "lr": 0.1, "val_acc": 0.6}])
    ok = convergence_report(sel, h, {"val_acc": 0.803, "test_acc": 0.8, "c": 1.0})
    assert ok["probe_converged"] and ok["heads_converged"] and ok["probe_gap"] == pytest.approx(0.003)
    far = convergence_report(sel, h, {"val_acc": 0.85, "test_acc": 0.8, "c": 1.0})
    assert not far["probe_converged"] and far["probe_gap"] == pytest.approx(0.05)
    h2 = _history({("probe", 0, np.nan, 0.1): [0.5, 0.8, 0.8, 0.8, 0.8], ("interp", 0, 0.5, 0.1): [0.1, 0.2, 0.3, 0.4, 0.6]})
    rising = convergence_report(sel, h2, {"val_acc": 0.8, "test_acc": 0.8, "c": 1.0})
    assert rising["probe_converged"] and not rising["heads_converged"] and rising["n_rising"] == 1


def test_a_short_budget_is_reported_unconverged_and_a_long_one_converged() -> None:
    """The whole check on a real sweep: badly scaled features (a large common offset, the failure
    the budget rule addresses) with too few Adam steps are flagged; the default-like budget is not."""
    tr, va, te = (_blobs(n, 6, 3, s, scale=0.05, offset=0.0) for n, s in ((240, 0), (240, 1), (240, 2)))
    ref = reference_probe(tr, va, te, num_classes=3)
    concepts = ConceptSpace("vectors", vectors=torch.nn.functional.normalize(torch.randn(6, 6), dim=1))
    splits = [Split(*s) for s in (tr, va, te)]
    kw = dict(sparsities=(0.5,), learning_rates=(1e-1,), seeds=(0,), epochs=5, probe_centering=False)
    short = sweep(*splits, concepts, 3, SweepParams(steps=1, min_batches_per_epoch=1, **kw), progress=False)
    long = sweep(*splits, concepts, 3, SweepParams(steps=1500, **kw), progress=False)
    r_short = convergence_report(short.selected, short.history, ref.to_dict())
    r_long = convergence_report(long.selected, long.history, ref.to_dict())
    assert short.budget.steps == 5 and long.budget.steps >= 1500
    assert not r_short["probe_converged"] and r_short["probe_gap"] > 0.05
    assert r_long["probe_converged"], r_long


def test_n_dropped_is_exact_on_the_default_grid() -> None:
    """k = floor(s*M) in exact rational arithmetic on the decimal grid values, every M up to 2,000
    (naive float products are wrong for some pairs, e.g. s = 0.7, M = 90: 0.7 * 90 = 62.99999999999999)."""
    assert n_dropped(0.7, 90) == 63
    wrong_naive = 0
    for m in range(1, 2001):
        for s in ("0", "0.1", "0.3", "0.5", "0.7", "0.9", "0.95", "0.98"):
            exact = (Fraction(s).numerator * m) // Fraction(s).denominator
            assert n_dropped(float(s), m) == exact, (s, m)
            wrong_naive += math.floor(float(s) * m) != exact
    assert wrong_naive > 0  # the case the exact arithmetic is for does occur on this grid


def test_the_budget_check_fires_on_a_rising_history_and_at_most_5_percent_on_noise() -> None:
    from iis_study.core.scoring.convergence import simulate_budget_flags

    noise = simulate_budget_flags(40, trend=0.0, seed=3, n_boot=200)
    assert (~noise).mean() <= 0.05
    rising = simulate_budget_flags(10, trend=0.4, seed=4, n_boot=200)
    assert (~rising).mean() >= 0.8


def test_the_budget_check_on_known_cases() -> None:
    from iis_study.core.scoring.convergence import budget_check

    rng = np.random.default_rng(0)
    full = rng.random((3, 9, 400)) < 0.8
    same = budget_check(full, full.copy(), (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98), n_boot=200)
    assert same["budget_delta"] == 0 and same["budget_converged"]
    worse = full.copy()
    worse[:, 1:, :120] = False  # at half the budget the heads had 30 % of the images wrong: a real trend
    moved = budget_check(full, worse, (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98), n_boot=200)
    assert moved["budget_delta"] > 0.1 and moved["budget_delta_ci_low"] > 0.01 and not moved["budget_converged"]
