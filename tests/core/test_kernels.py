"""The Newton solver's compiled CPU kernels (``core/solvers/kernels.py``) against numpy references written
row by row: the class blocks (dense by BLAS ``ssyrk``, sparse by rows' nonzero entries), their float32 Cholesky
factors, and one head's preconditioned conjugate gradients against a Hessian built entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from iis_study.core.solvers import kernels, newton


def _design(n: int, f: int, keep: int | None, seed: int, ragged: bool = False) -> np.ndarray:
    """``[X 1]`` (N, F+1) float32; with ``keep``, each row keeps its ``keep`` largest |x| (as the study's masks);
    ``ragged``: every third row keeps one fewer and the first row none (padded entries in the sparse storage)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f)).astype(np.float32)
    if keep is not None:
        drop = np.argsort(-np.abs(x), axis=1)[:, keep:]
        np.put_along_axis(x, drop, 0.0, axis=1)
        if ragged:
            smallest = np.argsort(np.where(x == 0, np.inf, np.abs(x)), axis=1)[::3, :1]
            np.put_along_axis(x[::3], smallest, 0.0, axis=1)
            x[0] = 0.0
    return np.ascontiguousarray(np.hstack([x, np.ones((n, 1), np.float32)]))


def _softmax(n: int, k: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((k, n)) * 2.0
    e = np.exp(z - z.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)  # (K, N)


def _blocks_reference(xa: np.ndarray, curv: np.ndarray, scale: float, ridge: float) -> np.ndarray:
    """``scale · Σ_n curv_kn x_n x_nᵀ + ridge I`` per class, float64, one outer product at a time."""
    k, (n, f1) = curv.shape[0], xa.shape
    out = np.zeros((k, f1, f1))
    for c in range(k):
        for i in range(n):
            row = xa[i].astype(np.float64)
            out[c] += float(curv[c, i]) * np.outer(row, row)
    return scale * out + ridge * np.eye(f1)


@pytest.mark.parametrize("keep", [None, 3])
def test_the_class_blocks_and_their_factors_match_a_row_by_row_reference(keep) -> None:
    """Dense (``ssyrk``) and sparse (ragged rows: padded entries, an empty row), and the batched ``bmm`` build a
    GPU runs, against blocks summed one outer product at a time."""
    n, f, k = 80, 24, 4
    xa = _design(n, f, keep, seed=1, ragged=keep is not None)
    rows = kernels.RowDesign(xa)
    assert rows.sparse_build == (keep is not None)
    p = _softmax(n, k, seed=2)
    curv = np.ascontiguousarray(p * (1 - p))
    ref = _blocks_reference(xa, curv, 1.0 / n, 1e-3)
    grams = np.full((k, f + 1, f + 1), np.nan, np.float32)
    kernels.weighted_grams(rows, curv, grams, 1.0 / n, 1e-3)
    np.testing.assert_allclose(grams, ref, rtol=1e-5, atol=1e-6)
    batched = newton.batched_blocks(torch.from_numpy(xa)[None], torch.zeros(1, dtype=torch.long),
                                    torch.from_numpy(curv)[None])
    np.testing.assert_allclose(batched[0].double().numpy() / n + 1e-3 * np.eye(f + 1), ref, rtol=1e-5, atol=1e-6)
    chol = np.full((k, f + 1, f + 1), np.nan, np.float32)
    assert np.all(kernels.class_factors(rows, curv, chol, 1.0 / n, 1e-3) == np.float32(1e-3))  # no jitter
    assert np.all(np.triu(chol, 1) == 0.0)
    np.testing.assert_allclose(chol.astype(np.float64) @ chol.transpose(0, 2, 1), ref, rtol=1e-4, atol=1e-6)


def test_a_rank_deficient_block_gets_the_smallest_ridge_that_factors() -> None:
    """Lite0's 16-d first stage: 200 concepts of rank ~17 at a per-sample penalty of ~1e-6. In float32 the
    block's null-space eigenvalues (the penalty) sit below the rounding of its sums, so ``spotrf`` fails; the
    block is factored again with a small share of its mean diagonal (the study's run hit this)."""
    rng = np.random.default_rng(11)
    n, f, k, lam = 400, 120, 3, 1e-9
    x = (rng.standard_normal((n, 4)) @ rng.standard_normal((4, f))).astype(np.float32)  # rank 4
    xa = np.ascontiguousarray(np.hstack([x, np.ones((n, 1), np.float32)]))
    p = _softmax(n, k, seed=12)
    curv = np.ascontiguousarray(p * (1 - p))
    rows = kernels.RowDesign(xa)
    chol = np.empty((k, f + 1, f + 1), np.float32)
    ridges = kernels.class_factors(rows, curv, chol, 1.0 / n, lam)
    mean_diag = (curv @ (xa.astype(np.float64) ** 2).sum(axis=1)) / n / (f + 1)
    # float32 could not factor with the penalty alone, and a small share (<= 1e-3) of the diagonal sufficed
    assert np.all(ridges > np.float32(lam)) and np.all(ridges <= lam + 1e-3 * mean_diag)
    ref = _blocks_reference(xa, curv, 1.0 / n, 0.0) + ridges[:, None, None] * np.eye(f + 1)
    np.testing.assert_allclose(chol.astype(np.float64) @ chol.transpose(0, 2, 1), ref, rtol=1e-3,
                               atol=1e-4 * mean_diag.max())
    # the float64 factorisation (the GPU's) escalates the same way: blocks pushed indefinite by 1e-4 of their mean
    # diagonal in the null space factor with a ridge of at most 1e-3 of it
    shift = 1e-4 * mean_diag[:, None, None] * np.eye(f + 1)
    blocks = torch.from_numpy(_blocks_reference(xa, curv, 1.0, 0.0) - n * shift)[None]
    got = newton.factor64(blocks, n, torch.tensor([lam], dtype=torch.float64))[0].double().numpy()
    gap = got @ got.transpose(0, 2, 1) - (blocks[0].numpy() / n + lam * np.eye(f + 1))
    assert np.all(np.isfinite(gap))
    assert np.all(np.abs(gap) <= 1.2e-3 * mean_diag[:, None, None])  # a ridge of at most 1e-3 x the mean diagonal
    assert np.all(np.diagonal(gap, axis1=1, axis2=2) > 1e-4 * mean_diag[:, None])  # and more than the shift


def test_a_block_no_ridge_can_factor_is_an_error(monkeypatch) -> None:
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((200, 2)) @ rng.standard_normal((2, 60))).astype(np.float32)  # rank 2
    rows = kernels.RowDesign(np.ascontiguousarray(np.hstack([x, np.ones((200, 1), np.float32)])))
    curv = np.ascontiguousarray(np.full((2, 200), 0.1, np.float32))
    chol = np.empty((2, 61, 61), np.float32)
    monkeypatch.setattr(kernels, "JITTER", ())  # no ridge to try: float32 cannot factor the rank-2 blocks
    with pytest.raises(FloatingPointError, match="not positive definite"):
        kernels.class_factors(rows, curv, chol, 1.0 / 200, 1e-10)
    curv[1, 7] = np.nan  # a softmax gone NaN
    with pytest.raises(ValueError, match="finite"):
        kernels.class_factors(rows, curv, chol, 1.0 / 200, 1e-10)


def test_the_sparse_rows_hold_exactly_the_design() -> None:
    xa = _design(50, 80, 4, seed=4)
    rows = kernels.RowDesign(xa)
    assert rows.sparse_build and rows.sparse_products and rows.cols.shape == (50, 4)
    back = np.zeros((50, 80), np.float32)
    np.put_along_axis(back, rows.cols.astype(np.int64), rows.vals, axis=1)
    np.testing.assert_array_equal(back, xa[:, :-1])
    assert not kernels.RowDesign(_design(50, 80, 40, seed=4)).sparse_build  # half the columns: dense
    mid = kernels.RowDesign(_design(50, 80, 10, seed=4))  # an eighth: blocks from the entries, BLAS products
    assert mid.sparse_build and not mid.sparse_products and mid.xat.shape == (81, 50)


def test_a_bad_design_is_refused() -> None:
    with pytest.raises(ValueError, match="ones"):
        kernels.RowDesign(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="float32"):
        kernels.RowDesign(_design(5, 3, None, seed=0).astype(np.float64))
    rows = kernels.RowDesign(_design(5, 3, None, seed=0))
    with pytest.raises(ValueError, match="shapes"):
        kernels.weighted_grams(rows, np.ones((2, 6), np.float32), np.empty((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        kernels.weighted_grams(rows, -np.ones((2, 5), np.float32), np.empty((2, 4, 4), np.float32))


def _hessian(xa: np.ndarray, p: np.ndarray, lam: float) -> np.ndarray:
    """The multinomial Hessian ``Σ_n (diag p_n - p_n p_nᵀ) ⊗ x_n x_nᵀ / N + λ`` (the bias unpenalised), float64,
    entry by entry in the (class, feature) order of a flattened (K, F+1) vector."""
    n, f1 = xa.shape
    k = p.shape[0]
    h = np.zeros((k * f1, k * f1))
    for i in range(n):
        pi = p[:, i].astype(np.float64)
        outer = np.outer(xa[i], xa[i])
        for a in range(k):
            for b in range(k):
                h[a * f1:(a + 1) * f1, b * f1:(b + 1) * f1] += ((a == b) * pi[a] - pi[a] * pi[b]) * outer / n
    for a in range(k):
        for j in range(f1 - 1):
            h[a * f1 + j, a * f1 + j] += lam
    return h


@pytest.mark.parametrize("keep, sparse", [(None, False), (3, False), (3, True)])
def test_the_conjugate_gradients_solve_the_newton_system(keep, sparse) -> None:
    """Run to a tight goal, ``d`` solves ``H d = b`` for ``b`` with ``Σ_k b_k = 0`` (a gradient's: the Hessian is
    singular along a common shift of every class's bias, which ``b`` never has); the sparse storage on ragged rows
    (padded entries, an empty row)."""
    n, f, k, lam = 90, 12, 3, 1e-3
    xa = _design(n, f, keep, seed=5, ragged=keep is not None)
    p = _softmax(n, k, seed=6)
    share = 1.0 if sparse else 0.0
    rows = kernels.RowDesign(xa, sparse_build=share, sparse_products=share)
    assert rows.sparse_build == rows.sparse_products == sparse
    curv = np.ascontiguousarray(p * (1 - p))
    chol = np.empty((k, f + 1, f + 1), np.float32)
    assert np.all(kernels.class_factors(rows, curv, chol, 1.0 / n, lam) == np.float32(lam))
    b = np.random.default_rng(7).standard_normal((k, f + 1)).astype(np.float32)
    b -= b.mean(axis=0)
    with threadpool_limits(1, user_api="blas"):
        d, products = kernels.conjugate_gradients(rows, p, chol, lam, b, 1e-4 * np.linalg.norm(b), 0.0, 500)
    h = _hessian(xa, p, lam)
    np.testing.assert_allclose(h @ d.astype(np.float64).ravel(), b.ravel(), atol=2e-4 * np.linalg.norm(b))
    assert 1 < products < 500


def test_dense_and_sparse_rows_give_the_same_step_as_the_batched_torch_solver() -> None:
    """The compiled CG (dense and sparse storage of one sparse design) against the batched torch CG the GPU runs:
    the same number of products and the same step to float32 rounding."""
    n, f, k, lam = 120, 30, 4, 1e-2
    xa = _design(n, f, 3, seed=8)
    g = torch.Generator().manual_seed(9)
    design = newton.DenseDesign(torch.from_numpy(xa[:, :-1]).double()[None], torch.arange(n) % k, k)
    groups = torch.tensor([0])
    lam_t = torch.tensor([lam], dtype=torch.float64)
    theta = 0.3 * torch.randn(1, k, f + 1, generator=g, dtype=torch.float64)
    theta -= theta.mean(dim=1, keepdim=True)  # Σ_k w_k = 0, as every iterate of the solver
    _, grad, p = newton.loss_grad(design, groups, theta, lam_t)
    pre = newton.ClassBlocks(design, groups, p, lam_t)
    eta = torch.tensor([1e-3], dtype=torch.float64)
    b = (-grad[0]).float().numpy()
    goal = float(1e-3 * np.linalg.norm(b))
    results = []
    with threadpool_limits(1, user_api="blas"):
        for sparse_width in (0.0, 1.0):
            rows = kernels.RowDesign(xa, sparse_build=sparse_width, sparse_products=sparse_width)
            assert rows.sparse_products == (sparse_width == 1.0)
            results.append(kernels.conjugate_gradients(rows, p[0].float().numpy(), pre.chol[0].numpy(), lam, b,
                                                       goal, 0.0, 200))
    # the batched torch CG, the form a GPU runs
    torch_d, torch_products = _torch_cg(design, groups, p, pre, lam_t, grad, eta)
    for d, products in results:
        assert products == torch_products
        np.testing.assert_allclose(d, torch_d, rtol=1e-3, atol=1e-4 * np.abs(torch_d).max())


def _torch_cg(design, groups, p, pre, lam, grad, eta):
    d, products = newton.batched_conjugate_gradients(design, groups, p.float(), pre, lam, grad, eta, 0.0, 200)
    return d[0].float().numpy(), int(products[0])
