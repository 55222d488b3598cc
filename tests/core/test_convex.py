"""The convex estimator (METHOD §4, "The estimator"): every head at a certified optimum.

The reference is scikit-learn's ``LogisticRegression(solver="lbfgs")`` (another solver, another
library) on masked activations computed here with numpy (argsort), not with the project's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from iis_study.core.heads import ConceptSpace, Split, SweepParams, convex_many, HeadsProblem, fit_heads, sparsify
from iis_study.core.heads.convex import keep_ranks
from iis_study.core.solvers.lbfgs import solve_logistic
from iis_study.core.scoring.scores import score_sweep

SPARSITIES = (0.0, 0.5, 0.9, 0.98)


def _problem(n: int = 240, d: int = 24, m: int = 50, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(k, d, generator=g)
    def split(size: int) -> Split:
        y = torch.arange(size) % k
        return Split(x=(means[y] + 1.5 * torch.randn(size, d, generator=g)).float(), y=y)
    c = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return split(n), split(n // 2), split(n // 2), ConceptSpace("vectors", vectors=c), k


def _masked_np(x: np.ndarray, c: np.ndarray, s: float) -> np.ndarray:
    """LN(z·Cᵀ) without affine, then keep the M - floor(s·M) largest |a| (ties: lower index), in numpy."""
    a = x.astype(np.float64) @ c.astype(np.float64).T
    a = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)
    m = a.shape[1]
    keep = m - int(np.floor(round(s * m, 9)))
    order = np.argsort(-np.abs(a), axis=1, kind="stable")
    out = np.zeros_like(a)
    rows = np.arange(a.shape[0])[:, None]
    out[rows, order[:, :keep]] = a[rows, order[:, :keep]]
    return out


def _sk_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> float:
    z = x @ w.T + b
    z = z - z.max(1, keepdims=True)
    ce = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    return float(ce.mean() + (w * w).sum() / (2 * c * len(y)))


def test_every_convex_head_equals_scikit_learn_at_the_same_c() -> None:
    train, val, test, space, k = _problem()
    x = train.x.clone()
    x[7] = 0.0  # an all-zero feature row: its concept scores are all 0, LN maps them to 0 (an all-zero design row)
    train = Split(x=x, y=train.y)
    grid = (0.1, 1.0, 10.0)
    cfg = SweepParams(sparsities=SPARSITIES, l2_grid=grid, tolerance=1e-9, max_iter=5000)
    result = convex_many(train, val, test, {"p": space}, k, cfg, progress=False)["p"]
    assert result.certificate.certified
    state_table = result.table
    for pi, s in enumerate(SPARSITIES):
        xs = _masked_np(x.numpy(), space.vectors.numpy(), s)
        assert np.all(xs[7] == 0)
        for ci, c in enumerate(grid):
            sk = LogisticRegression(C=c, solver="lbfgs", tol=1e-12, max_iter=100_000).fit(xs, train.y.numpy())
            ours = _head(result, cfg, pi, ci, x, space)
            w_sk, b_sk = sk.coef_, sk.intercept_
            f_sk = _sk_objective(xs, train.y.numpy(), w_sk, b_sk, c)
            f_ours = _sk_objective(xs, train.y.numpy(), ours[0], ours[1], c)
            assert abs(f_ours - f_sk) <= 1e-6 * abs(f_sk), (s, c, f_ours, f_sk)
            assert np.abs(ours[0] - w_sk).max() <= 1e-4, (s, c)
            assert np.abs((ours[1] - ours[1].mean()) - (b_sk - b_sk.mean())).max() <= 1e-4, (s, c)
            row = state_table[(state_table["head"] == "interp") & (state_table["sparsity"] == s) & (state_table["c"] == c)]
            assert float(row["grad"].iloc[0]) <= 1e-9
            # the table's accuracies are those of scikit-learn's head on val and test (rows mapped right)
            for split, col in ((val, "val_acc"), (test, "test_acc")):
                xs_split = _masked_np(split.x.numpy(), space.vectors.numpy(), s)
                assert float(row[col].iloc[0]) == float((sk.predict(xs_split) == split.y.numpy()).mean()), (s, c, col)


def _head(result, cfg, pi, ci, x, space):
    """The fitted weights of head (sparsity pi, C ci), solved again through the solver alone, so that
    every head of the grid (not only the selected one) is compared."""
    from iis_study.core.heads.activations import precompute_base
    from iis_study.core.heads.convex import ConceptDesign
    from iis_study.core.heads.masks import n_dropped

    m = space.m
    design = ConceptDesign([precompute_base(x, space)], [m - n_dropped(s, m) for s in cfg.sparsities], result_y(x))
    fit = solve_logistic(design, result.num_classes, cfg.l2_grid, tol=cfg.tolerance, max_iter=cfg.max_iter)
    return fit.weight[pi, ci].numpy(), fit.bias[pi, ci].numpy()


def result_y(x):  # the labels of _problem's train split
    return torch.arange(x.shape[0]) % 4


def test_the_selected_heads_are_the_solver_heads_and_selection_is_on_val() -> None:
    train, val, test, space, k = _problem(seed=1)
    cfg = SweepParams(sparsities=SPARSITIES, tolerance=1e-8)
    result = convex_many(train, val, test, {"p": space}, k, cfg, progress=False)["p"]
    table, sel = result.table, result.selected
    for _, row in sel.iterrows():
        part = table[(table["head"] == row["head"]) & (table["sparsity"].fillna(-1) == (-1 if np.isnan(row["sparsity"]) else row["sparsity"]))]
        best = part["val_acc"].max()
        assert row["val_acc"] == best
        assert row["c"] == part.loc[part["val_acc"] == best, "c"].min()  # ties: the stronger penalty
    assert result.test_correct.shape == (1, 1 + len(SPARSITIES), test.x.shape[0])
    assert np.allclose(result.test_correct.mean(-1)[0], sel["test_acc"].to_numpy())


def test_the_stored_heads_reproduce_the_reported_test_predictions() -> None:
    train, val, test, space, k = _problem(seed=6)
    result = convex_many(train, val, test, {"p": space}, k, SweepParams(sparsities=SPARSITIES), progress=False)["p"]
    st = result.state
    y = test.y.numpy()
    probe = (test.x.double() @ st["probe.weight"][0].double().T + st["probe.bias"][0].double()).argmax(1).numpy()
    assert np.array_equal(probe == y, result.test_correct[0, 0])
    for pi, s in enumerate(SPARSITIES):
        xs = torch.as_tensor(_masked_np(test.x.numpy(), space.vectors.numpy(), s))
        pred = (xs @ st["interp.weight"][0, pi].double().T + st["interp.bias"][0, pi].double()).argmax(1).numpy()
        assert np.array_equal(pred == y, result.test_correct[0, 1 + pi]), s
    assert torch.equal(st["interp.ln_weight"], torch.ones_like(st["interp.ln_weight"]))


def test_a_head_given_too_few_iterations_is_reported_uncertified() -> None:
    train, val, test, space, k = _problem(seed=2)
    cfg = SweepParams(sparsities=SPARSITIES, tolerance=1e-8, max_iter=3)
    result = convex_many(train, val, test, {"p": space}, k, cfg, progress=False)["p"]
    cert = result.certificate
    assert not cert.certified
    assert cert.uncertified and cert.max_grad_all > 1e-8
    assert cert.iterations <= 3
    assert not result.table["certified"].all()


def test_the_iis_is_the_same_on_one_and_two_threads() -> None:
    # M = 200 correlated concepts: LAPACK's factorisation of their preconditioners rounds differently on 1 and 2
    # threads unless it runs on one (with that undone, the fitted weights differ here)
    train, val, test, space, k = _problem(n=800, d=64, m=200, k=10, seed=3)
    cfg = SweepParams(sparsities=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98))
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = fit_heads(HeadsProblem(train, val, test, {"p": space}, k), cfg, progress=False)["p"]
            out[threads] = (score_sweep(res, n_boot=10)[0]["iis"], res.test_correct, res.state)
    finally:
        torch.set_num_threads(before)
    assert abs(out[1][0] - out[2][0]) <= 1e-6
    assert np.array_equal(out[1][1], out[2][1])
    for name in out[1][2]:  # the same iterates, bit for bit
        assert torch.equal(out[1][2][name], out[2][2][name]), name


def test_keep_ranks_is_the_sparsify_mask() -> None:
    a = torch.randn(50, 40)
    a[3, :10] = 0.5  # ties: the lower index first
    a[3, 10:20] = -0.5
    ranks = keep_ranks(a)
    for k_drop in (0, 1, 20, 39):
        mask = ranks < (40 - k_drop)
        assert torch.equal(a * mask, sparsify(a, k_drop))


def test_end_to_end_concepts_are_refused_by_the_convex_estimator_with_a_clear_error() -> None:
    train, val, test, _, k = _problem()
    e2e = ConceptSpace("end_to_end", elements=torch.randn(60, train.x.shape[1]), n_concepts=5)
    with pytest.raises(ValueError, match="sweep.estimator: adam"):
        convex_many(train, val, test, {"e": e2e}, k, SweepParams(), progress=False)


def test_the_estimator_parameter_is_checked() -> None:
    with pytest.raises(ValueError, match="sweep.estimator"):
        SweepParams(estimator="sgd")
    with pytest.raises(ValueError, match="sweep.l2_grid"):
        SweepParams(l2_grid=(0.0,))
    with pytest.raises(ValueError, match="sweep.tolerance"):
        SweepParams(tolerance=0)


def test_a_convex_result_round_trips_through_the_catalog_dataset(tmp_path) -> None:
    from iis_study.datasets import SweepResultDataset

    train, val, test, space, k = _problem(seed=4)
    cfg = SweepParams(sparsities=SPARSITIES, max_iter=5)
    result = convex_many(train, val, test, {"p": space}, k, cfg, progress=False)["p"]
    ds = SweepResultDataset(str(tmp_path / "sweep"))
    ds.save(result)
    back = ds.load()
    assert back.certificate == result.certificate and back.estimator == "convex"
    assert np.array_equal(back.test_correct, result.test_correct)
    assert back.seeds == (0,) and back.history.empty
    pd_cols = ["head", "c", "val_acc", "test_acc", "grad", "iterations", "certified"]
    assert back.table[pd_cols].equals(result.table[pd_cols])


def test_the_l2_path_rule_stops_a_head_where_val_accuracy_falls() -> None:
    train, val, test, space, k = _problem(seed=5)
    full = convex_many(train, val, test, {"p": space}, k, SweepParams(sparsities=SPARSITIES), progress=False)["p"]
    path = convex_many(train, val, test, {"p": space}, k, SweepParams(sparsities=SPARSITIES, l2_path=True),
                       progress=False)["p"]
    assert full.table["solved"].all()
    early = 0
    for (head, sp), part in path.table.groupby(["head", path.table["sparsity"].fillna(-1)], sort=False):
        ref = full.table[(full.table["head"] == head) & (full.table["sparsity"].fillna(-1) == sp)]
        solved = part["solved"].to_numpy()
        n = int(solved.sum())
        assert solved[:n].all() and not solved[n:].any()  # a prefix of the grid, strongest penalty first
        vals = ref["val_acc"].to_numpy()
        assert np.allclose(part["val_acc"].to_numpy()[:n], vals[:n])  # the same heads where solved
        # it stopped exactly at the first fall (or ran to the end)
        falls = [i for i in range(1, len(vals)) if vals[i] < vals[i - 1]]
        assert n == (falls[0] + 1 if falls else len(vals))
        early += n < len(vals)
    assert early > 0  # precondition: the rule had something to stop
    # heads the path did not reach do not count against the certificate
    from iis_study.core.scoring.blocks import ScoringParams
    from iis_study.core.scoring.convergence import ReferenceProbe
    from iis_study.core.scoring.steps import convergence_record

    ref = ReferenceProbe(val_acc=0.5, test_acc=0.5, c=1.0, iterations=1, converged=True)
    record = convergence_record(path, ref, ScoringParams())
    assert path.certificate.certified and record["probe_converged"] and record["heads_converged"]
