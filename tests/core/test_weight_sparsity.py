"""Weight sparsity (core/scoring/weight_sparsity.py): the elastic-net path against scikit-learn, NEC, ANEC and the nulls."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from iis_study.core.scoring.blocks import WeightSparsityParams
from iis_study.core.heads import Split
from iis_study.core.scoring import weight_sparsity as ws
from iis_study.core.scoring.weight_sparsity import (
    _fista,
    accuracy_at_nec,
    anec,
    elastic_net_paths,
    weight_sparsity_scores,
)


def _problem(seed: int = 0, n: int = 300, m: int = 12, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    a = torch.randn(n, m, generator=g, dtype=torch.float64)
    a[:, :k] += 1.5 * F.one_hot(y, k).double()  # the first k columns carry the classes
    return (a - a.mean(0)) / a.std(0), y


def test_one_solve_matches_scikit_learns_elastic_net():
    """The objective mean CE + λ(α‖W‖₁ + (1-α)/2‖W‖²), bias free, is scikit-learn's with C = 1/(Nλ), l1_ratio = α."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    a, y = _problem()
    n, m, k, alpha, lam = a.shape[0], a.shape[1], 3, 0.9, 0.02
    design = torch.cat([a, torch.ones(n, 1, dtype=a.dtype)], 1)
    lip = 0.5 * torch.linalg.eigvalsh(design.T @ design / n)[-1]
    w, b, kkt, _ = _fista(a.unsqueeze(0), F.one_hot(y, k).double(), torch.zeros(1, k, m, dtype=a.dtype),
                          torch.zeros(1, k, dtype=a.dtype), torch.tensor([lam], dtype=a.dtype), alpha,
                          lip.view(1), tolerance=1e-9, max_iter=200_000)
    assert float(kkt[0]) <= 1e-9
    ref = sklearn.LogisticRegression(solver="saga", l1_ratio=alpha, C=1.0 / (n * lam),
                                     tol=1e-12, max_iter=100_000).fit(a.numpy(), y.numpy())
    np.testing.assert_allclose(w[0].numpy(), ref.coef_, atol=2e-4)
    assert set(np.flatnonzero(np.abs(ref.coef_.ravel()) > 1e-6)) == set(np.flatnonzero(w[0].numpy().ravel()))
    # the bias is free: the softmax is invariant to a shift, so compare centred biases
    np.testing.assert_allclose(b[0].numpy() - b[0].numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-4)


def _splits(seed: int = 0, d: int = 16, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (240, 90, 90):
        y = torch.arange(n) % k
        x = torch.randn(n, d, generator=g) + 2.0 * F.one_hot(y, d).float()
        out.append(Split(x=x, y=y))
    return out


def test_the_path_starts_empty_is_certified_and_batching_changes_nothing():
    train, val, test = _splits()
    g = torch.Generator().manual_seed(3)
    sets = {f"s{i}": F.normalize(torch.randn(8, 16, generator=g), dim=1) for i in range(3)}
    params = WeightSparsityParams(path_length=12)
    both = elastic_net_paths(train, val, test, sets, 3, params)
    assert list(both.groupby("set").size()) == [12, 12, 12]
    assert (both[both["step"] == 0]["nec"] == 0).all()  # λ_max: every weight zero
    assert (both["kkt"] <= params.tolerance).all()
    assert both.groupby("set")["nec"].max().gt(0).all()
    alone = elastic_net_paths(train, val, test, {"s1": sets["s1"]}, 3, params)
    pd.testing.assert_frame_equal(both[both["set"] == "s1"].reset_index(drop=True), alone, atol=1e-6)


def test_anec_selects_on_val_within_the_budget_and_reports_test():
    path = pd.DataFrame({"step": [0, 1, 2, 3], "nec": [0.0, 4.0, 5.0, 9.0], "val_acc": [0.1, 0.6, 0.6, 0.9],
                         "test_acc": [0.1, 0.55, 0.7, 0.95]})
    assert accuracy_at_nec(path, 5) == 0.55  # tie on val at NEC <= 5: the sparser model
    assert accuracy_at_nec(path, 10) == 0.95
    assert accuracy_at_nec(path, 3) == 0.1
    assert anec(path, (5, 10)) == (0.55, pytest.approx((0.55 + 0.95) / 2))


def test_scores_average_draws_and_stand_beside_each_null():
    rows = []
    for name, acc in (("draw/prototype/0", 0.8), ("draw/prototype/1", 0.6), ("null/random/0", 0.5),
                      ("null/random/1", 0.3), ("null/rotated.prototype/0", 0.7), ("null/rotated.prototype/1", 0.7),
                      ("draw/cluster/0", 0.1)):
        rows += [{"set": name, "step": 0, "nec": 0.0, "val_acc": 0.1, "test_acc": 0.1, "kkt": 0.0},
                 {"set": name, "step": 1, "nec": 5.0, "val_acc": acc, "test_acc": acc, "kkt": 0.0}]
    out = weight_sparsity_scores(pd.DataFrame(rows), "prototype", 2, ("random", "rotated"),
                                 WeightSparsityParams(nec_levels=(5, 10)))
    assert out["anec_5"] == pytest.approx(0.7) and out["anec_avg"] == pytest.approx(0.7)
    assert out["anec_avg_sd_draw"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert out["anec_5_null_random"] == pytest.approx(0.4)
    assert out["anec_avg_excess_rotated"] == pytest.approx(0.0)
    assert out["anec_certified"]


def test_bad_parameters_name_the_block():
    with pytest.raises(ValueError, match="weight_sparsity.alpha"):
        WeightSparsityParams(alpha=0.0)
    with pytest.raises(ValueError, match="weight_sparsity.nec_levels"):
        WeightSparsityParams(nec_levels=())


def test_a_type_without_a_path_gets_no_numbers():
    """End-to-end and textual concepts are not vectors the path can read: their scores carry no ANEC (not NaN, not
    'uncertified')."""
    paths = pd.DataFrame({"set": ["draw/prototype/0"], "step": [0], "nec": [0.0], "val_acc": [0.1], "test_acc": [0.1],
                          "kkt": [0.0]})
    assert weight_sparsity_scores(paths, "end_to_end", 1, ()) == {}


def test_path_points_match_scikit_learn_on_correlated_concepts():
    """Each path point (solved on a working set of concepts, certified on all) is scikit-learn's elastic-net fit
    at the same strength: the same support (NEC) and the same val accuracy. Correlated concepts make the strong
    rule leave out concepts that must enter (the working set has to grow)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from iis_study.core.scoring.weight_sparsity import _design

    train, val, _ = _splits(seed=1)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 16, generator=g)
    vectors = F.normalize(base.repeat(4, 1) + 0.6 * torch.randn(12, 16, generator=g), dim=1)  # 12 concepts, 3 groups
    params = WeightSparsityParams(path_length=10, min_ratio=1e-3, tolerance=1e-5, max_iter=50_000,
                                  nec_levels=(100,))
    path = elastic_net_paths(train, val, val, {"s": vectors}, 3, params)
    a = _design(train.x, vectors).double().numpy()
    mean, std = a.mean(0), a.std(0, ddof=1)
    a, a_val = (a - mean) / std, (_design(val.x, vectors).double().numpy() - mean) / std
    y = train.y.numpy()
    onehot = np.eye(3)[y]
    prior = onehot.mean(0)
    lam_max = np.abs((prior - onehot).T @ a / len(y)).max() / params.alpha * (1 + 1e-6)  # written apart
    for _, row in path[path["step"].isin([2, 4, 6, 8])].iterrows():
        lam = lam_max * row["lam"]
        ref = sklearn.LogisticRegression(solver="saga", l1_ratio=params.alpha, C=1.0 / (len(y) * lam),
                                         tol=1e-12, max_iter=200_000).fit(a, y)
        # within one weight: at a float32 tolerance of 1e-5 a weight at the edge of the threshold may go either way
        assert row["nec"] == pytest.approx((np.abs(ref.coef_) > 1e-7).sum() / 3, abs=1.01 / 3), row["step"]
        assert row["val_acc"] == pytest.approx((ref.predict(a_val) == val.y.numpy()).mean(), abs=1.5 / len(val.y))
        assert row["kkt"] <= params.tolerance


def test_a_working_set_that_starts_empty_grows_to_the_certified_solution():
    """``_solve_at`` from an empty working set (every concept left out) reaches the solution it reaches with every
    concept in: the concepts whose optimality condition fails are added until none does."""
    from iis_study.core.scoring.weight_sparsity import _solve_at

    a, y = _problem(seed=2)
    a = a.float().unsqueeze(0)
    onehot = F.one_hot(y, 3).float()
    b0 = onehot.mean(0).log().view(1, 3)
    lam = torch.tensor([0.02])
    out = {}
    for start in ("empty", "all"):
        cand = torch.full((1, 12), start == "all")
        out[start] = _solve_at(a, onehot, torch.zeros(1, 3, 12), b0.clone(), lam, cand, 0.9, 1e-5, 50_000)
    w_empty, _, kkt, _, _ = out["empty"]
    assert float(kkt[0]) <= 1e-5 and int((w_empty != 0).sum()) > 3
    torch.testing.assert_close(w_empty, out["all"][0], atol=1e-4, rtol=0)


def test_a_set_leaves_the_path_at_its_first_point_past_the_largest_level():
    """Only NEC <= the largest level is ever read: each set's path ends at its first point past it (the sets of a
    batch may end at different points), and what was solved before is unchanged."""
    train, val, test = _splits()
    g = torch.Generator().manual_seed(3)
    sets = {f"s{i}": F.normalize(torch.randn(8, 16, generator=g), dim=1) for i in range(3)}
    full = elastic_net_paths(train, val, test, sets, 3, WeightSparsityParams(path_length=12))
    short = elastic_net_paths(train, val, test, sets, 3, WeightSparsityParams(path_length=12, nec_levels=(1,)))
    for name, path in short.groupby("set"):
        assert (path["nec"].iloc[:-1] <= 1).all() and path["nec"].iloc[-1] > 1, name
        pd.testing.assert_frame_equal(path.reset_index(drop=True),
                                      full[full["set"] == name].iloc[: len(path)].reset_index(drop=True), atol=1e-6)
    assert short.groupby("set").size().lt(12).all()


def _correlated(seed: int = 1):
    train, val, test = _splits(seed=seed)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 16, generator=g)
    vectors = F.normalize(base.repeat(4, 1) + 0.6 * torch.randn(12, 16, generator=g), dim=1)  # 12 concepts, 3 groups
    return train, val, test, vectors


def test_newton_and_fista_reach_the_same_path_newton_in_a_few_steps():
    """Both solvers certify every point at a tight tolerance, so they find the same models (NEC, val and test
    accuracy); Newton needs a few steps a point where FISTA needs hundreds of iterations."""
    train, val, test, vectors = _correlated()
    paths = {}
    for solver in ("newton", "fista"):
        params = WeightSparsityParams(path_length=10, min_ratio=1e-3, tolerance=1e-6, max_iter=100_000,
                                      nec_levels=(100,), solver=solver)
        paths[solver] = elastic_net_paths(train, val, test, {"s": vectors}, 3, params)
        assert (paths[solver]["kkt"] <= 1e-6).all(), solver
    newton, fista = paths["newton"], paths["fista"]
    assert list(newton["step"]) == list(fista["step"])
    # within one weight: at the tolerance a weight at the edge of the threshold may be a hair off zero
    np.testing.assert_allclose(newton["nec"], fista["nec"], atol=1.01 / 3)
    np.testing.assert_allclose(newton[["val_acc", "test_acc"]], fista[["val_acc", "test_acc"]], atol=1.01 / 90)
    assert newton["iterations"].mean() <= 8 and fista["iterations"].mean() > 10 * newton["iterations"].mean()


def test_a_newton_solve_that_stalls_is_finished_by_fista(monkeypatch):
    """Newton cut off after one step per call leaves the point to FISTA, which certifies it: the path is the
    same as Newton's own."""
    import iis_study.core.scoring.weight_sparsity as ws

    train, val, test, vectors = _correlated()
    params = WeightSparsityParams(path_length=8, min_ratio=1e-3, tolerance=1e-6, max_iter=100_000,
                                  nec_levels=(100,))
    full = elastic_net_paths(train, val, test, {"s": vectors}, 3, params)
    monkeypatch.setattr(ws, "NEWTON_STEPS", 1)
    cut = elastic_net_paths(train, val, test, {"s": vectors}, 3, params)
    assert (cut["kkt"] <= 1e-6).all()
    assert cut["iterations"].max() > full["iterations"].max()  # FISTA's iterations were added
    pd.testing.assert_frame_equal(cut[["nec", "val_acc", "test_acc"]], full[["nec", "val_acc", "test_acc"]])


def test_the_path_solver_is_checked():
    with pytest.raises(ValueError, match="weight_sparsity.solver"):
        WeightSparsityParams(solver="cd")


def test_the_paths_do_not_depend_on_the_worker_count_and_keep_step_order(monkeypatch):
    """Each set's path is one call on the pool, on one torch thread: the same bits on 1 and 3 workers, rows step by step with
    the sets in the given order (as one batched call wrote them); a bad worker count is refused."""
    train, val, test = _splits()
    g = torch.Generator().manual_seed(5)
    sets = {f"s{i}": F.normalize(torch.randn(8, 16, generator=g), dim=1) for i in (2, 0, 1)}
    params = WeightSparsityParams(path_length=8)
    one = elastic_net_paths(train, val, test, sets, 3, params, workers=1)
    calls = []
    inner = ws.paths_of

    def spy(train, val, test, sets, *args):
        calls.append((list(sets), threading.current_thread() is threading.main_thread()))
        return inner(train, val, test, sets, *args)

    monkeypatch.setattr(ws, "paths_of", spy)
    three = elastic_net_paths(train, val, test, sets, 3, params, workers=3)
    assert sorted(calls) == [(["s0"], False), (["s1"], False), (["s2"], False)]  # one set a call, on the pool
    pd.testing.assert_frame_equal(one, three, check_exact=True)
    assert list(one["set"][:3]) == ["s2", "s0", "s1"] and list(one["step"]) == sorted(one["step"])
    with pytest.raises(ValueError, match="workers"):
        elastic_net_paths(train, val, test, sets, 3, params, workers=0)
