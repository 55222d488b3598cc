"""The elastic-net path's compiled proximal Newton (``core/solvers/path_newton.py``): the Hessian on a step's free
weights against a sum of Kronecker products, the L1 model's minimiser against its optimality conditions and
against coordinate descent run out, and one point's whole solve against the optimality conditions of the
elastic-net problem (float64, written with numpy)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from iis_study.core.solvers import path_newton
from tests.core.test_kernels import _softmax


def test_the_free_hessian_matches_a_sum_of_kronecker_products() -> None:
    """Weights in any order (two classes' columns interleaved, the biases first, a padding column of zeros): each
    entry equals the same entry of ``Σ_n kron(diag p_n - p_n p_nᵀ, x_n x_nᵀ) / N`` (float64, one image at a
    time) plus the ridge on the diagonal."""
    n, f, k = 60, 6, 3
    rng = np.random.default_rng(3)
    x = np.hstack([rng.standard_normal((n, f)), np.ones((n, 1)), np.zeros((n, 1))]).astype(np.float32)
    prob = _softmax(n, k, 4).T.copy()  # (N, K)
    col = np.array([f, f, 0, 3, 0, 5, 2, f + 1, 3, f])
    cls = np.array([0, 2, 1, 1, 0, 2, 0, 0, 2, 1])
    ridge = np.linspace(0.1, 1.0, len(col))
    out = np.empty((len(col), len(col)))
    with threadpool_limits(1):
        path_newton.free_hessian(x, col, cls, prob, ridge, out)
    x64, p64 = x.astype(np.float64), prob.astype(np.float64)
    full = sum(np.kron(np.diag(p64[i]) - np.outer(p64[i], p64[i]), np.outer(x64[i], x64[i])) for i in range(n)) / n
    flat = cls * x.shape[1] + col  # kron's index of (class, column)
    np.testing.assert_allclose(out, full[np.ix_(flat, flat)] + np.diag(ridge), atol=2e-7)
    assert np.array_equal(out, out.T)


def _qp_kkt(hess, grad, start, l1, penalised, step) -> float:
    """The largest violation of the L1 model's optimality conditions at ``start + step`` (0 at its minimiser)."""
    g = grad + hess @ step
    x = start + step
    pen = np.where(x != 0, np.abs(g + l1 * np.sign(x)), np.maximum(np.abs(g) - l1, 0.0))
    return float(np.where(penalised, pen, np.abs(g)).max())


def _collinear_qp(seed: int = 0):
    """An L1 model on 40 weights whose columns span 6 dimensions (as 200 concepts of a 16-d layer): coordinate
    descent crawls on it."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((200, 6))
    cols = basis @ rng.standard_normal((6, 40)) + 0.05 * rng.standard_normal((200, 40))
    hess = cols.T @ cols / 200 + 1e-3 * np.eye(40)
    grad = rng.standard_normal(40) * 0.2
    start = np.where(rng.random(40) < 0.3, rng.standard_normal(40), 0.0)
    penalised = np.arange(40) < 37  # the last three: biases
    return hess[None], grad[None], start[None], np.array([0.1]), penalised[None]


def test_the_l1_model_is_minimised_on_collinear_columns_only_with_the_support_solves() -> None:
    """With 60 sweeps, coordinate descent alone stops far from the minimiser of a collinear model; with the
    solves on the support (after 5 sweeps) the step meets the optimality conditions to rounding, and it lowers
    the model below coordinate descent's."""
    hess, grad, start, l1, pen = _collinear_qp()
    forcing = np.array([1e-12])

    def model(step):
        x = start[0] + step
        return grad[0] @ step + 0.5 * step @ hess[0] @ step + l1[0] * np.abs(x[pen[0]]).sum()

    cd = path_newton.lasso_qp(hess, grad, start, l1, pen, forcing, 60, 10**6, 0)[0]
    solved = path_newton.lasso_qp(hess, grad, start, l1, pen, forcing, 60, 5, 50)[0]
    reference = path_newton.lasso_qp(hess, grad, start, l1, pen, forcing, 100_000, 10**6, 0)[0]  # CD run out
    assert _qp_kkt(hess[0], grad[0], start[0], l1[0], pen[0], reference) < 1e-9
    assert _qp_kkt(hess[0], grad[0], start[0], l1[0], pen[0], cd) > 1e-2
    assert _qp_kkt(hess[0], grad[0], start[0], l1[0], pen[0], solved) < 1e-9
    np.testing.assert_allclose(solved, reference, atol=1e-6)
    assert model(solved) < model(cd)
    assert np.array_equal(start[0] + solved != 0, start[0] + reference != 0)  # the same support
    assert np.count_nonzero(start[0] + solved) < 37  # the L1 term keeps weights at zero


def test_a_support_that_cannot_be_factored_leaves_coordinate_descent_to_finish() -> None:
    """Two identical columns and no ridge: the support's block is singular, LAPACK refuses it, and coordinate
    descent alone goes on: the step is coordinate descent's, bit for bit."""
    v = np.array([1.0, 2.0, -1.0])
    hess = np.outer(v, v)[[0, 0, 1, 2]][:, [0, 0, 1, 2]][None] + np.diag([0.0, 0.0, 1.0, 1.0])[None]
    hess[0, 0, 0] = hess[0, 1, 1] = hess[0, 0, 1] = hess[0, 1, 0] = 1.0
    grad, start = np.array([[-1.0, -1.0, 0.5, 0.2]]), np.array([[0.5, 0.5, 0.0, 0.0]])
    pen = np.ones((1, 4), bool)
    step = path_newton.lasso_qp(hess, grad, start, np.array([0.01]), pen, np.array([1e-14]), 200, 1, 50)[0]
    cd = path_newton.lasso_qp(hess, grad, start, np.array([0.01]), pen, np.array([1e-14]), 200, 10**6, 0)[0]
    assert np.array_equal(step, cd) and np.isfinite(step).all()


def _elastic_net_kkt(a, labels, w, b, l1, l2) -> float:
    """The largest entry of the minimum-norm subgradient of ``mean CE + l1‖W‖₁ + l2/2‖W‖²`` (numpy, float64)."""
    z = w @ a.T + b[:, None]
    p = np.exp(z - z.max(axis=0))
    p /= p.sum(axis=0)
    p[labels, np.arange(len(labels))] -= 1.0
    gw, gb = p @ a / len(labels) + l2 * w, p.mean(axis=1)
    sub = np.where(w != 0, np.abs(gw + l1 * np.sign(w)), np.maximum(np.abs(gw) - l1, 0.0))
    return float(max(sub.max(), np.abs(gb).max()))


def _point(seed: int = 2):
    rng = np.random.default_rng(seed)
    n, m, k = 150, 9, 3
    labels = rng.integers(0, k, n)
    base = rng.standard_normal((n, 3)) + labels[:, None] * 0.7
    a = np.hstack([base, base @ rng.standard_normal((3, m - 3)) + 0.1 * rng.standard_normal((n, m - 3))])
    a = (a - a.mean(axis=0)) / a.std(axis=0)
    prior = np.bincount(labels, minlength=k) / n
    return a, labels, np.zeros((k, m)), np.log(prior)


def test_one_path_point_meets_the_elastic_net_optimality_conditions() -> None:
    """From the path's start (``W = 0``, the biases at the log prior), one call reaches a sparse model whose
    subgradient (recomputed with numpy) is within 1e-8, in a handful of Newton steps; the residual it reports is
    that subgradient."""
    a, labels, w, b = _point()
    l1, l2 = 0.03, 0.0003
    with threadpool_limits(1):
        res, steps = path_newton.proximal_newton(a, labels, w, b, l1, l2, 1e-8, 50, 0.01, 500, 150, 50)
    kkt = _elastic_net_kkt(a, labels, w, b, l1, l2)
    assert kkt < 1e-8 and abs(res - kkt) < 1e-12
    assert 0 < np.count_nonzero(w) < w.size  # the L1 term keeps some weights at zero
    assert steps <= 12


def test_a_capped_solve_stops_where_it_is_and_reports_its_residual() -> None:
    """One step allowed: the weights move once, and the residual returned is that of the returned point (above
    the tolerance), so the caller can hand the point to FISTA."""
    a, labels, w, b = _point()
    res, steps = path_newton.proximal_newton(a, labels, w, b, 0.03, 0.0003, 1e-10, 1, 0.01, 500, 150, 50)
    assert steps == 1 and np.count_nonzero(w) > 0
    assert res > 1e-10 and abs(res - _elastic_net_kkt(a, labels, w, b, 0.03, 0.0003)) < 1e-12


def test_the_support_solves_cut_the_newton_steps_on_collinear_concepts() -> None:
    """Six concepts that are mixtures of three, 30 coordinate-descent sweeps a step: with the support solves
    (after 5 sweeps) the point certifies at 1e-8 in fewer Newton steps than coordinate descent alone takes to the
    50-step cap, or at all."""
    rng = np.random.default_rng(4)
    n, k = 200, 3
    labels = rng.integers(0, k, n)
    base = rng.standard_normal((n, 3)) + labels[:, None] * 0.8
    a = np.hstack([base, base @ rng.standard_normal((3, 3)) + 1e-3 * rng.standard_normal((n, 3))])
    a = (a - a.mean(axis=0)) / a.std(axis=0)
    b0 = np.log(np.bincount(labels, minlength=k) / n)
    results = {}
    for name, refine_after in (("solves", 5), ("cd", 10**6)):
        w, b = np.zeros((k, 6)), b0.copy()
        res, steps = path_newton.proximal_newton(a, labels, w, b, 0.002, 2e-5, 1e-8, 50, 0.01, 30, refine_after, 50)
        results[name] = res, steps, _elastic_net_kkt(a, labels, w, b, 0.002, 2e-5)
    res, steps, kkt = results["solves"]
    assert kkt < 1e-8 and abs(res - kkt) < 1e-12
    assert steps < results["cd"][1]


def test_a_solve_at_its_optimum_stops_instead_of_stepping_in_place() -> None:
    """Asked for a residual of 0 at a point already solved to rounding, the solver stops within a few steps
    (no descent direction, or no step that lowers the objective) and reports the residual of the point it
    returns, instead of stepping to the cap. (The guard against a step that rounds back to the same weights is
    not reached here: no test constructs that case.)"""
    a, labels, w, b = _point()
    path_newton.proximal_newton(a, labels, w, b, 0.03, 0.0003, 1e-12, 50, 0.01, 500, 150, 50)
    res, steps = path_newton.proximal_newton(a, labels, w, b, 0.03, 0.0003, 0.0, 50, 0.01, 500, 150, 50)
    assert steps < 10
    assert abs(res - _elastic_net_kkt(a, labels, w, b, 0.03, 0.0003)) < 1e-12


def test_the_warm_up_compiles_every_solver_kernel() -> None:
    """``make setup`` runs the warm-up: in a fresh interpreter, afterwards each numba kernel the heads' and the
    path's Newton solvers call has a compiled (or cache-loaded) signature, and the solvers called as the study
    calls them compile no other (fails when a kernel family is left out of the warm-up: tried)."""
    import subprocess
    import sys

    code = (  # the kernels the solvers call from Python (the others are compiled into these)
        "import torch.nn.functional as F\n"
        "from iis_study.core.solvers import kernels, path_newton, warm\n"
        "from iis_study.core.solvers.lbfgs import solve_logistic\n"
        "from iis_study.core.scoring.weight_sparsity import elastic_net_paths\n"
        "from tests.core import test_convex, test_newton, test_weight_sparsity\n"
        "warm.warm()\n"
        "entry = {'gram': kernels._gram_kernel, 'cg': kernels._cg, 'path': path_newton._proximal_newton_kernel}\n"
        "missing = [n for n, fn in entry.items() if not fn.signatures]\n"
        "assert not missing, missing\n"
        "before = {n: len(fn.signatures) for n, fn in entry.items()}\n"
        "# the solvers as the study calls them, dense and sparse designs: no kernel compiles again\n"
        "train, _, _, space, k = test_convex._problem(n=120, d=16, m=40, k=3, seed=1)\n"
        "solve_logistic(test_newton._design(train, space, (0.0, 0.9)), k, (1.0,), tol=1e-6, max_iter=50,\n"
        "               solver='newton')\n"
        "train, val, test = test_weight_sparsity._splits()\n"
        "vectors = F.normalize(train.x[:8], dim=1)\n"
        "elastic_net_paths(train, val, test, {'s': vectors}, 3, {'path_length': 4})\n"
        "after = {n: len(fn.signatures) for n, fn in entry.items()}\n"
        "assert after == before, (before, after)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
