"""Null concepts, the two-level interval, and the inference across representations (docs/calibration.md)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from iis_study.core.scoring import calibration as cal
from iis_study.core.scoring import inference as inf
from iis_study.core.concepts import nulls

S = np.array([0.0, 0.3, 0.6, 0.9])


# --------------------------------------------------------------------------- null concepts


def test_rotated_concepts_span_the_same_subspace_and_keep_no_concept():
    rng = np.random.default_rng(0)
    c = torch.nn.functional.normalize(torch.rand(20, 64, dtype=torch.float64) + 0.5, dim=1).float()  # correlated, positive
    rot = nulls.rotated_within_span(c, nulls.null_rng(0, 0, "rotated")).double()
    assert rot.shape == c.shape
    assert torch.allclose(rot.norm(dim=1), torch.ones(20, dtype=torch.float64), atol=1e-6)
    q, _ = torch.linalg.qr(c.double().T)  # an orthonormal basis of the span of C's rows
    residual = rot.T - q @ (q.T @ rot.T)
    assert float(residual.norm(dim=0).max()) < 1e-5
    cos = rot @ c.double().T
    assert float(cos.max()) < 1 - 1e-4, "a rotated concept equals an original"
    # the check can fail: directions outside the span leave a residual
    other = nulls.random_directions(20, 64, rng).double()
    assert float((other.T - q @ (q.T @ other.T)).norm(dim=0).max()) > 0.1


def test_random_directions_are_unit_and_isotropic():
    v = nulls.random_directions(4000, 8, np.random.default_rng(1)).double()
    assert torch.allclose(v.norm(dim=1), torch.ones(4000, dtype=torch.float64), atol=1e-6)
    assert float(v.mean(0).abs().max()) < 0.05
    assert torch.allclose(v.T @ v / 4000, torch.eye(8, dtype=torch.float64) / 8, atol=0.02)


def test_gaussian_null_has_the_elements_mean_and_covariance():
    rng = np.random.default_rng(2)
    e = torch.as_tensor(rng.standard_normal((300, 5)) @ np.diag([3.0, 1, 1, 0.5, 0.1]) + 2.0)
    samples = nulls.gaussian_samples(e, 40000, np.random.default_rng(3))
    assert np.allclose(samples.mean(0), e.numpy().mean(0), atol=0.05)
    cov, ref = np.cov(samples.T), np.cov(e.numpy().T)  # against numpy's covariance of the elements
    assert np.abs(cov - ref).max() < 0.05 * np.abs(ref).max()
    out = nulls.gaussian_like(e, 50, np.random.default_rng(3))
    assert out.shape == (50, 5) and torch.allclose(out.norm(dim=1), torch.ones(50), atol=1e-6)


def test_build_draws_names_and_seeds():
    emb = torch.randn(100, 16)
    base = {"prototype": torch.nn.functional.normalize(emb[:10], dim=1)}
    drawn = []

    def draw(seed):
        drawn.append(seed)
        return torch.nn.functional.normalize(emb[seed : seed + 10], dim=1)

    d = nulls.build_draws(emb, base, 10, seed=5, draws=3, nulls=nulls.NULL_KINDS, draw_type={"prototype": draw})
    assert drawn == [6, 7]
    assert set(d.names("prototype")) == {
        "draw/prototype/1", "draw/prototype/2", *(f"null/{k}/{r}" for k in ("random", "gaussian", "rotated.prototype") for r in range(3))
    }
    again = nulls.build_draws(emb, base, 10, seed=5, draws=3, nulls=nulls.NULL_KINDS, draw_type={"prototype": draw})
    assert all(torch.equal(d.vectors[k], again.vectors[k]) for k in d.vectors)
    back = nulls.ConceptDraws.from_tensors(d.to_tensors())
    assert back.draws == 3 and back.nulls == nulls.NULL_KINDS and set(back.vectors) == set(d.vectors)
    with pytest.raises(ValueError, match="concepts.nulls"):
        nulls.build_draws(emb, base, 10, 0, 1, ["shuffled"], {"prototype": draw})


# --------------------------------------------------------------------------- the two-level interval


def _simulate(rng, r, n, sd_draw, rho, base=(0.8, 0.7, 0.55, 0.4), probe=0.9):
    """R draws' (1, 1 + P, N) predictions: head at sparsity j of draw r is right when U < p_j + δ_r; the
    U of an image is shared by every head and draw with probability rho (correlated errors)."""
    shared = rng.random(n)
    delta = rng.normal(0.0, sd_draw, size=r)
    out = []
    for d in range(r):
        u = np.where(rng.random(n) < rho, shared, rng.random(n))
        p = np.concatenate([[probe], np.asarray(base) + delta[d]])
        out.append((u[None, :] < p[:, None])[None])
    return out


def _population(base=(0.8, 0.7, 0.55, 0.4), probe=0.9):
    return float(cal.iis_along_last(S, np.asarray(base) / probe))


@pytest.mark.slow
@pytest.mark.parametrize("sd_draw,rho", [(0.02, 0.7), (0.0, 0.8)])
def test_two_level_interval_covers_at_its_level(sd_draw, rho):
    rng = np.random.default_rng(10)
    truth = _population()
    hits, n_rep = 0, 600
    for i in range(n_rep):
        draws = _simulate(rng, 3, 400, sd_draw, rho)
        out = cal.calibrated_scores(draws, {}, S, n_boot=300, seed=i, ci=0.95)
        hits += out["iis_ci_low"] <= truth <= out["iis_ci_high"]
    coverage = hits / n_rep
    assert 0.925 <= coverage <= 0.975, coverage


def test_naive_nested_bootstrap_undercovers_where_the_two_level_interval_does_not():
    """The reason for the interval's form: resampling 3 draws with replacement misses the draw variance."""
    rng = np.random.default_rng(11)
    truth = _population()
    naive = good = 0
    n_rep = 200
    for i in range(n_rep):
        draws = _simulate(rng, 3, 400, 0.08, 0.7)
        point = np.array([cal.set_iis(c, S) for c in draws])
        boot = cal.boot_iis_sets(draws, S, 200, np.random.default_rng(i))
        pick = np.random.default_rng(i + 1).integers(0, 3, size=(200, 3))
        nested = np.take_along_axis(boot, pick, axis=1).mean(1)
        lo, hi = np.percentile(nested, [2.5, 97.5])
        naive += lo <= truth <= hi
        iv = cal.two_level(point, boot, 0.95)
        good += iv["ci_low"] <= truth <= iv["ci_high"]
    assert naive / n_rep < 0.85 and good / n_rep > 0.9, (naive, good)


def test_single_draw_is_the_test_bootstrap_percentile_interval():
    rng = np.random.default_rng(4)
    draws = _simulate(rng, 1, 300, 0.0, 0.5)
    out = cal.calibrated_scores(draws, {}, S, n_boot=500, seed=0, ci=0.9)
    boot = cal.boot_iis_sets(draws, S, 500, np.random.default_rng(0))[:, 0]
    lo, hi = np.percentile(boot, [5, 95])
    assert out["iis_ci_low"] == pytest.approx(lo) and out["iis_ci_high"] == pytest.approx(hi)
    assert out["iis"] == pytest.approx(cal.set_iis(draws[0], S))


def test_iis_per_set_against_a_hand_trapezoid():
    c = np.zeros((1, 5, 4), dtype=bool)
    c[0, 0] = [1, 1, 1, 1]
    c[0, 1] = [1, 1, 1, 0]
    c[0, 2] = [1, 1, 0, 0]
    c[0, 3] = [1, 0, 0, 0]
    c[0, 4] = [0, 0, 0, 0]
    # ARR 0.75, 0.5, 0.25, 0 on s = 0, 0.3, 0.6, 0.9: 0.3 * (0.625 + 0.375 + 0.125)
    assert cal.set_iis(c, S) == pytest.approx(0.3375)


def test_excess_is_paired_by_draw_and_null_of_itself_is_zero():
    rng = np.random.default_rng(5)
    draws = _simulate(rng, 3, 300, 0.02, 0.5)
    same = cal.calibrated_scores(draws, {"random": draws}, S, n_boot=200, seed=0, ci=0.95)
    assert same["iis_excess_random"] == 0 and same["iis_excess_random_ci_low"] == 0 == same["iis_excess_random_ci_high"]
    worse = _simulate(rng, 3, 300, 0.02, 0.5, base=(0.5, 0.4, 0.3, 0.2))
    out = cal.calibrated_scores(draws, {"random": worse}, S, n_boot=200, seed=0, ci=0.95)
    assert out["iis_excess_random"] == pytest.approx(out["iis"] - out["iis_null_random"])
    assert out["iis_excess_random_ci_low"] > 0
    with pytest.raises(ValueError, match="paired by draw"):
        cal.calibrated_scores(draws, {"random": worse[:2]}, S, n_boot=10, seed=0, ci=0.95)


def test_draw_results_round_trip():
    rng = np.random.default_rng(6)
    d = cal.DrawResults({"draw/prototype/1": rng.random((1, 5, 7)) < 0.5}, {"draw/prototype/1": True}, 2, ("random",), "prototype")
    back = cal.DrawResults.from_tensors(d.to_tensors())
    assert np.array_equal(back.correct["draw/prototype/1"], d.correct["draw/prototype/1"])
    assert back.certified == {"draw/prototype/1": True} and back.draws == 2 and back.nulls == ("random",)
    assert back.concept_type == "prototype" and back.draw_sets() == ["draw/prototype/1"]


# --------------------------------------------------------------------------- inference across representations


def _exact_enumeration(x, y, method):
    f = {"pearson": lambda a, b: stats.pearsonr(a, b)[0], "spearman": lambda a, b: stats.spearmanr(a, b)[0],
         "kendall": lambda a, b: stats.kendalltau(a, b)[0]}[method]
    obs = abs(f(x, y))
    vals = [abs(f(x, np.asarray(y)[list(p)])) for p in itertools.permutations(range(len(x)))]
    return sum(v >= obs - 1e-12 for v in vals) / len(vals)


@pytest.mark.parametrize("method", inf.METHODS)
def test_permutation_p_equals_exact_enumeration_n6(method):
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=6), rng.normal(size=6)
    y = y + 0.8 * x
    assert inf.permutation_p(x, y)[method] == pytest.approx(_exact_enumeration(x, y, method))


def test_permutation_p_monte_carlo_above_eight():
    rng = np.random.default_rng(8)
    x = rng.normal(size=12)
    p = inf.permutation_p(x, x + rng.normal(size=12) * 3, n_perm=4000, seed=1)
    assert 0 < p["pearson"] <= 1
    assert inf.permutation_p(x, x, n_perm=999)["pearson"] == pytest.approx(1 / 1000)


def test_family_bootstrap_never_splits_a_family():
    families = ["a", "a", "a", "b", "b", "c", "c", "c", "d", "e", None]
    clusters = inf._clusters(len(families), families)
    assert sorted(map(len, clusters)) == [1, 1, 1, 2, 3, 3]
    rng = np.random.default_rng(0)
    for _ in range(500):
        counts = np.bincount(inf.cluster_resample(clusters, rng), minlength=len(families))
        for c in clusters:  # every member of a family is drawn as often as the family
            assert len(set(counts[c])) == 1
    # and a resample that split a family would fail the check
    assert len(set(np.bincount([0, 1, 0], minlength=3)[clusters[0]])) > 1


def test_no_interval_with_fewer_than_five_units():
    x = np.array([0.1, 0.5, 0.3, 0.9])
    out = inf.correlate_across(x, x ** 2, n_boot=100)
    assert out["interval"] == inf.TOO_FEW and math.isnan(out["pearson"]["ci_low"])
    assert out["pearson"]["p_perm"] == pytest.approx(_exact_enumeration(x, x ** 2, "pearson"))
    fam = inf.correlate_across(np.arange(8.0), np.arange(8.0) ** 1.5, families=list("aabbccdd"), n_boot=100)
    assert fam["interval"] == inf.TOO_FEW and fam["n_clusters"] == 4
    five = inf.correlate_across(np.arange(10.0), np.arange(10.0) ** 1.5, families=list("aabbccddee"), n_boot=100)
    assert five["interval"] == "bootstrap over families" and five["pearson"]["ci_low"] > 0.9


def test_ranking_stability():
    a = np.array([[1.0, 1.1, 0.9], [2.0, 2.2, 2.1], [3.0, 2.9, 3.3], [4.0, 4.4, 3.9]])
    out = inf.ranking_stability(a)
    assert out["kendall_tau_mean"] == 1.0 and out["n_pairs"] == 3
    a[0, 2] = 5.0
    assert inf.ranking_stability(a)["kendall_tau_min"] < 1


# --------------------------------------------------------------------------- the self-test of the metric


def _small_sweep():
    from dataclasses import replace

    from iis_study.core.heads import SweepParams

    return replace(SweepParams(), sparsities=(0.0, 0.5, 0.8, 0.9), l2_grid=(1.0, 10.0), device="cpu")


def test_self_test_iis_follows_the_share_and_the_null_does_not():
    from iis_study.core.scoring.selftest import self_test

    rows = self_test((0.0, 0.5, 1.0), sweep=_small_sweep(), draws=3, n_boot=200, sizes=(400, 200, 400))
    assert rows["certified"].all()
    assert stats.spearmanr(rows["share"], rows["iis"])[0] == 1.0
    assert rows["iis"].iloc[-1] - rows["iis"].iloc[0] > 0.2
    null_spread = rows["iis_null_random"].max() - rows["iis_null_random"].min()
    assert null_spread < 0.25 * (rows["iis"].max() - rows["iis"].min())
    assert rows["probe_accuracy"].max() - rows["probe_accuracy"].min() < 0.05  # the probe does not see the knob
    # concepts that carry the class information beat random directions; random concepts do not
    assert rows["excess_ci_low"].iloc[-1] > 0
    for r in rows.itertuples():
        assert r.random_concepts_excess_ci_low <= 0 <= r.random_concepts_excess_ci_high
