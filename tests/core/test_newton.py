"""The truncated Newton solver of the convex heads (issue 31): same optimum, far fewer steps.

References written independently of the project's solvers: scikit-learn's ``LogisticRegression`` with its
``newton-cholesky`` solver (exact multinomial Hessian, Cholesky) and its ``lbfgs`` solver, on masked
activations computed with numpy (``_masked_np``); and the project's L-BFGS solver on the same design.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from iis_study.core.heads import SweepParams, convex_many
from iis_study.core.solvers import newton as newton_mod
from iis_study.core.heads.activations import precompute_base
from iis_study.core.heads.convex import ConceptDesign
from iis_study.core.solvers.lbfgs import nested_levels, solve_logistic
from iis_study.core.heads.masks import n_dropped
from tests.core.test_convex import _masked_np, _problem, _sk_objective

SPARSITIES = (0.0, 0.5, 0.9)
GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _design(train, space, sparsities=SPARSITIES):
    m = space.m
    keeps = [m - n_dropped(s, m) for s in sparsities]
    return ConceptDesign([precompute_base(train.x, space)], keeps, train.y.long())


@pytest.mark.parametrize("sk_solver", ["newton-cholesky", "lbfgs"])
def test_newton_heads_equal_scikit_learn_at_every_c(sk_solver: str) -> None:
    train, _, _, space, k = _problem(n=300, d=24, m=40, k=4, seed=11)
    fit = solve_logistic(_design(train, space), k, GRID, tol=1e-9, max_iter=200, solver="newton")
    assert bool(fit.certified.all())
    y = train.y.numpy()
    for pi, s in enumerate(SPARSITIES):
        xs = _masked_np(train.x.numpy(), space.vectors.numpy(), s)
        for ci, c in enumerate(GRID):
            sk = LogisticRegression(C=c, solver=sk_solver, tol=1e-12, max_iter=100_000).fit(xs, y)
            w, b = fit.weight[pi, ci].numpy(), fit.bias[pi, ci].numpy()
            f_sk = _sk_objective(xs, y, sk.coef_, sk.intercept_, c)
            f_ours = _sk_objective(xs, y, w, b, c)
            # ours is certified to 1e-9 in the gradient: never worse than scikit-learn's beyond rounding
            assert f_ours <= f_sk + 1e-9 * abs(f_sk), (s, c, f_ours, f_sk)
            if c <= 10:  # well conditioned: the same weights (at C = 1000 the objective is flat along many)
                assert np.abs(w - sk.coef_).max() <= 1e-4, (s, c)
                assert np.array_equal((xs @ w.T + b).argmax(1), sk.predict(xs)), (s, c)


def test_newton_and_lbfgs_reach_the_same_optimum_in_far_fewer_steps() -> None:
    train, _, _, space, k = _problem(n=400, d=32, m=60, k=5, seed=12)
    design = _design(train, space)
    nt = solve_logistic(design, k, GRID, tol=1e-8, max_iter=6000, solver="newton")
    lb = solve_logistic(design, k, GRID, tol=1e-8, max_iter=6000, solver="lbfgs")
    assert bool(nt.certified.all()) and bool(lb.certified.all())
    # the same objective value at every head (both certified to 1e-8 in the gradient)
    assert torch.allclose(nt.loss, lb.loss, rtol=0, atol=1e-9)
    assert int(nt.iterations.max()) <= 15  # Newton steps per head and strength
    assert int(nt.iterations.sum()) * 10 < int(lb.iterations.sum())
    assert nt.products is not None and bool((nt.products > 0).all())
    # the preconditioner projected onto Σ_k v_k = 0 (ClassBlocks): at the weak penalties about 25-32 products a
    # head and strength here; without the projection 50-70
    assert float(nt.products[:, 2:].double().mean()) <= 40, nt.products


def test_the_newton_solver_is_the_default_and_is_checked() -> None:
    assert SweepParams().solver == "newton"
    with pytest.raises(ValueError, match="sweep.solver"):
        SweepParams(solver="sgd")
    train, _, _, space, k = _problem(seed=13)
    with pytest.raises(ValueError, match="sweep.solver"):
        solve_logistic(_design(train, space), k, GRID, solver="sgd")


def test_the_warm_start_along_c_is_used() -> None:
    """Each strength starts from the previous strength's solution: at the weak penalties every head needs fewer
    Newton steps than the same head started from zero (the test fails without the warm start), and both reach
    the same optimum."""
    train, _, _, space, k = _problem(n=300, d=24, m=40, k=4, seed=14)
    design = _design(train, space)
    warm = solve_logistic(design, k, GRID, tol=1e-7, max_iter=200, solver="newton")
    for ci, c in enumerate(GRID):
        cold = solve_logistic(design, k, (c,), tol=1e-7, max_iter=200, solver="newton", nested=False)
        assert bool(cold.certified.all()) and bool(warm.certified[:, ci].all())
        assert torch.allclose(cold.loss[:, 0], warm.loss[:, ci], rtol=0, atol=1e-8)
        if c >= 10:
            assert bool((warm.iterations[:, ci] < cold.iterations[:, 0]).all()), (c, warm.iterations, cold.iterations)


def test_the_warm_start_along_the_nested_masks_is_used() -> None:
    """At the strongest penalty (no stronger one's solution to start from) each sparsity's head starts from the
    solution at the next lower sparsity, whose kept set contains its own: fewer Hessian-vector products than the
    same heads from zero (fails when that start is dropped), the same optimum."""
    train, _, _, space, k = _problem(n=400, d=32, m=60, k=5, seed=16)
    design = _design(train, space, (0.9, 0.0, 0.5, 0.7))  # out of order: the chain follows the kept counts
    parents = design.nested_parents()
    assert parents.tolist() == [3, -1, 1, 2]
    x, _ = next(design.blocks(torch.arange(4), torch.float64))
    for g, p in enumerate(parents.tolist()):
        if p >= 0:  # the parent keeps every entry the child keeps
            assert bool(((x[g] != 0) <= (x[p] != 0)).all()) and bool((x[g][x[g] != 0] == x[p][x[g] != 0]).all())
    grid = (0.1, 1.0)
    nested = solve_logistic(design, k, grid, tol=1e-8, max_iter=200)
    cold = solve_logistic(design, k, grid, tol=1e-8, max_iter=200, nested=False)
    assert bool(nested.certified.all()) and bool(cold.certified.all())
    assert torch.allclose(nested.loss, cold.loss, rtol=0, atol=1e-10)
    child = parents >= 0
    assert bool((nested.products > 0).all()) and bool((nested.iterations > 0).all())  # every head's record kept
    # the root (the dense head) starts from zero either way: the same steps and products
    assert torch.equal(nested.iterations[~child, 0], cold.iterations[~child, 0])
    assert torch.equal(nested.products[~child, 0], cold.products[~child, 0])
    warm_products, cold_products = int(nested.products[child, 0].sum()), int(cold.products[child, 0].sum())
    assert warm_products < 0.8 * cold_products, (nested.products[:, 0], cold.products[:, 0])


def test_nested_parents_stay_within_each_concept_space() -> None:
    train, _, _, space, k = _problem(n=200, d=16, m=30, k=3, seed=17)
    keeps = [30 - n_dropped(s, 30) for s in (0.0, 0.5, 0.9)]
    other = type(space)(kind="vectors", vectors=space.vectors.flip(0))
    design = ConceptDesign([precompute_base(train.x, space), precompute_base(train.x, other)], keeps, train.y.long())
    assert design.nested_parents().tolist() == [-1, 0, 1, -1, 3, 4]


def test_nested_levels_order_parents_first_and_refuse_a_cycle() -> None:
    levels = nested_levels(torch.tensor([3, -1, 1, 2, -1]), 5)
    assert [(i.tolist(), None if p is None else p.tolist()) for i, p in levels] == [
        ([1, 4], None), ([2], [1]), ([3], [2]), ([0], [3])]
    assert [i.tolist() for i, p in nested_levels(None, 3)] == [[0, 1, 2]]
    with pytest.raises(ValueError, match="cycle"):
        nested_levels(torch.tensor([1, 0, -1]), 3)
    with pytest.raises(ValueError, match="group indices"):
        nested_levels(torch.tensor([5, -1]), 2)


def test_a_wide_design_falls_back_to_lbfgs(monkeypatch) -> None:
    train, _, _, space, k = _problem(seed=15)
    called = []
    monkeypatch.setattr(newton_mod, "newton", lambda *a, **kw: called.append(1))
    monkeypatch.setattr(newton_mod, "MAX_FEATURES", 10)  # the concept design has M + 1 = 51 columns
    fit = solve_logistic(_design(train, space), k, (1.0,), tol=1e-6, max_iter=2000, solver="newton")
    assert not called and bool(fit.certified.all()) and fit.products.sum() == 0


def test_a_streamed_design_falls_back_to_lbfgs(monkeypatch) -> None:
    """A design too large to hold is streamed in row blocks: Newton would build it whole, so L-BFGS solves it."""
    from iis_study.core.heads import convex

    train, _, _, space, k = _problem(seed=17)
    monkeypatch.setattr(convex, "MATERIALISE_BYTES", 0)
    design = _design(train, space)
    assert not design.materialised
    called = []
    monkeypatch.setattr(newton_mod, "newton", lambda *a, **kw: called.append(1))
    fit = solve_logistic(design, k, (1.0,), tol=1e-6, max_iter=2000, solver="newton")
    assert not called and bool(fit.certified.all())


def test_the_newton_estimator_selects_the_same_heads_as_lbfgs() -> None:
    train, val, test, space, k = _problem(seed=16)
    res = {
        sv: convex_many(train, val, test, {"p": space}, k, SweepParams(sparsities=SPARSITIES, solver=sv), progress=False)["p"]
        for sv in ("newton", "lbfgs")
    }
    assert res["newton"].certificate.certified and res["lbfgs"].certificate.certified
    assert np.array_equal(res["newton"].test_correct, res["lbfgs"].test_correct)
    assert res["newton"].selected["c"].tolist() == res["lbfgs"].selected["c"].tolist()


def _thread_counts() -> tuple[int, str | None]:
    """torch's (OpenMP's) thread count and MKL's where torch has MKL."""
    import re

    found = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
    return torch.get_num_threads(), found.group(1) if found else None


def _fresh_thread_counts() -> tuple[int, str | None]:
    """The counts a thread started now begins with (its first torch call reads the process-wide count)."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(_thread_counts()))
    t.start()
    t.join()
    return out[0]


def test_the_newton_heads_do_not_depend_on_the_worker_count() -> None:
    """One head per call on one torch thread: the same bits on 1, 2 and 3 workers; the caller's thread counts
    (OpenMP's and MKL's) and those a thread started afterwards begins with are unchanged (a worker sets its own to
    one, which also writes the process-wide count)."""
    # the study's shape (M = 200, K = 10): here a batch's composition changes the bits of its products (solving
    # as many heads a call as there are workers fails this test; at N = 400, M = 160, K = 8 it did not)
    train, _, _, space, k = _problem(n=1000, d=64, m=200, k=10, seed=12)
    design = _design(train, space, (0.0, 0.3, 0.6, 0.9))
    before = _thread_counts(), _fresh_thread_counts()
    fits = [solve_logistic(design, k, GRID, tol=1e-7, max_iter=200, workers=w) for w in (1, 2, 3)]
    assert (_thread_counts(), _fresh_thread_counts()) == before
    assert bool(fits[0].certified.all())
    for fit in fits[1:]:
        assert torch.equal(fit.weight, fits[0].weight) and torch.equal(fit.bias, fits[0].bias)
        assert torch.equal(fit.products, fits[0].products)


def test_the_newton_heads_are_solved_one_per_call_on_the_pool(monkeypatch) -> None:
    """The per-head pool is used on the CPU: every call of the inner solver sees one head, off the main thread."""
    import threading

    train, _, _, space, k = _problem(n=200, d=16, m=24, k=3, seed=13)
    seen = []
    inner = newton_mod.newton

    def spy(design, theta, *args, **kwargs):
        seen.append((theta.shape[0], threading.current_thread() is threading.main_thread()))
        return inner(design, theta, *args, **kwargs)

    monkeypatch.setattr(newton_mod, "newton", spy)
    fit = solve_logistic(_design(train, space), k, (0.1, 1.0), tol=1e-7, max_iter=200, workers=2)
    assert bool(fit.certified.all())
    assert len(seen) == len(SPARSITIES) * 2
    assert all(h == 1 and not main for h, main in seen), seen


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_a_bad_worker_count_is_refused(workers) -> None:
    train, _, _, space, k = _problem(n=100, d=8, m=8, k=3, seed=14)
    with pytest.raises(ValueError, match="workers"):
        solve_logistic(_design(train, space), k, (1.0,), workers=workers)


def test_the_class_block_preconditioner_solves_each_block_and_projects() -> None:
    """``ClassBlocks(r)`` = each class's block ``Σ_n p_nk(1 - p_nk) [x_n 1][x_n 1]ᵀ / N + λ I`` solved against
    ``r_k`` (float64 ``numpy.linalg.solve`` on blocks summed row by row here), then the mean over classes removed."""
    g = torch.Generator().manual_seed(21)
    n, f, k = 60, 7, 4
    x = torch.randn(2, n, f, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    design = newton_mod.DenseDesign(x, y, k)
    groups = torch.tensor([1, 0, 1])
    theta = torch.randn(3, k, f + 1, generator=g, dtype=torch.float64)
    lam = torch.tensor([1e-2, 1e-3, 1e-1], dtype=torch.float64)
    _, _, p = newton_mod.loss_grad(design, groups, theta, lam)
    pre = newton_mod.ClassBlocks(design, groups, p, lam)
    r = torch.randn(3, k, f + 1, generator=g)
    got = pre(r).double().numpy()
    for h in range(3):
        xa = np.hstack([x[groups[h]].numpy(), np.ones((n, 1))])
        z = np.empty((k, f + 1))
        for c in range(k):
            block = sum(float(p[h, c, i] * (1 - p[h, c, i])) * np.outer(xa[i], xa[i]) for i in range(n)) / n
            z[c] = np.linalg.solve(block + float(lam[h]) * np.eye(f + 1), r[h, c].double().numpy())
        np.testing.assert_allclose(got[h], z - z.mean(axis=0), rtol=2e-4, atol=2e-5)
