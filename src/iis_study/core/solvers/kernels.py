"""The truncated Newton solver's CPU kernels, compiled by numba and run without holding the GIL (the elastic-net
path's are in :mod:`.path_newton`).

On the CPU the solver runs one head a call on a pool of single-threaded workers
(:func:`~iis_study.core.device.worker_pool`), so what costs is a head's own work, not batching. Two kernels:

- :func:`weighted_grams`, the preconditioner's class blocks ``[X 1]ᵀ diag(c_k) [X 1]``: BLAS ``ssyrk`` forms one
  triangle (half the flops of ``torch.bmm``'s square). scipy's Python wrappers of BLAS hold the GIL for the whole
  call, so two workers would take turns; the routine is called through the pointer ``scipy.linalg.cython_blas``
  exports, from a ``nogil`` numba function, so both run at once (:mod:`.blas`: the pointer is an argument, so the
  kernel is cached on disk like the others; compiled in as a constant it cost a second's compilation in every
  process).
- :func:`conjugate_gradients`, the preconditioned conjugate gradients of one Newton step of one head: the
  Hessian-vector product as two BLAS products (numba's ``np.dot``, scipy's BLAS), the class blocks applied by
  forward and back substitution on their Cholesky factors, and the vector updates in one compiled loop. The
  ~20 small torch operations a CG iteration took cost as much as its products (``scripts/bench_newton_parts.py``).

Both expect scipy's BLAS on one thread (:func:`~iis_study.core.device.worker_pool` limits it, and loads scipy's BLAS
first so that the limit reaches it): a multi-threaded product splits its sums differently and rounds differently
on another machine's core count.
"""

from __future__ import annotations

import numba
import numpy as np

from .blas import c_float32, call_void, routine, syrk


# a design group whose rows keep at most this fraction of the F columns builds its class blocks / runs its
# Hessian-vector products from the rows' nonzero entries. Measured at N 1,079, F 200, K 10 on one thread (as the
# workers run; issue 31's notes): the sparse build is faster up to ~44 kept (22 %), the sparse product up to ~25
# (12 %). The shares below are more cautious; at the study's masks (4, 10, 20, 60 of 200 kept) they differ from the
# crossovers only in the 20-kept level's products (~0.02 ms an iteration, under 1 % of the heads' time)
SPARSE_BUILD = 0.15
SPARSE_PRODUCTS = 0.07


class RowDesign:
    """One design group ``[X 1]`` (N, F+1), float32, as the compiled kernels read it: dense (with its transpose,
    for the Hessian-vector product's second BLAS product) and, where every row has few nonzero features (the
    study's sparsest masks keep 4, 10 and 20 of 200 concepts), by each row's nonzero entries (``cols``, ``vals``
    (N, width), padded with value 0). From those a class block costs ``N · width²`` instead of ``N · (F+1)²``
    (used while ``width <= sparse_build · F``) and a product ``N · width`` instead of ``N · (F+1)`` per class
    (while ``width <= sparse_products · F``; scattered, so the BLAS product wins sooner)."""

    def __init__(self, xa: np.ndarray, sparse_build: float = SPARSE_BUILD,
                 sparse_products: float = SPARSE_PRODUCTS) -> None:
        c_float32("RowDesign", xa=xa)
        if xa.ndim != 2 or xa.shape[1] < 2 or not np.all(xa[:, -1] == 1):
            raise ValueError(f"RowDesign: xa must be (N, F+1) with a last column of ones, got {xa.shape}")
        self.xa = xa
        f = xa.shape[1] - 1
        nonzero = xa[:, :-1] != 0
        width = max(1, int(nonzero.sum(axis=1).max()))
        self.sparse_build = width <= sparse_build * f
        self.sparse_products = width <= sparse_products * f
        self.cols, self.vals = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32)
        if self.sparse_build or self.sparse_products:
            cols = np.argsort(~nonzero, axis=1, kind="stable")[:, :width]  # each row's nonzeros first, in order
            self.cols = np.ascontiguousarray(cols, dtype=np.int32)
            self.vals = np.ascontiguousarray(np.take_along_axis(xa, cols, axis=1))
        self.xat = np.zeros((1, 1), np.float32) if self.sparse_products else np.ascontiguousarray(xa.T)


@numba.njit(nogil=True, cache=True)
def _sparse_gram(cols, vals, curv, block):  # pragma: no cover - compiled
    # block's lower triangle (C order) += Σ_n curv_n [x_n 1][x_n 1]ᵀ from the rows' nonzero entries
    n, width = cols.shape
    bias = block.shape[0] - 1
    for i in range(n):
        w = curv[i]
        if w == 0.0:
            continue
        for a in range(width):
            xa_ = vals[i, a]
            if xa_ == 0.0:
                continue
            ja = cols[i, a]
            wa = w * xa_
            for b in range(a + 1):
                jb = cols[i, b]
                if ja >= jb:
                    block[ja, jb] += wa * vals[i, b]
                else:
                    block[jb, ja] += wa * vals[i, b]
            block[bias, ja] += wa
        block[bias, bias] += w


def _lapack_addresses() -> tuple[int, int]:
    """The addresses of scipy's ``ssyrk`` (BLAS) and ``spotrf`` (LAPACK), this process's."""
    return routine("ssyrk"), routine("spotrf")


@numba.njit(nogil=True, cache=True)
def _gram_kernel(x, cols, vals, sparse, curv, scale, ridge, factor, out, info, ssyrk, spotrf):  # pragma: no cover
    # the class blocks (see class_factors), float32 arrays; ssyrk, spotrf: the routines' addresses
    n, f = x.shape
    a = np.empty((n, f) if not sparse else (1, 1), np.float32)  # one class's weighted rows at a time
    # ``a`` in C order (N, F) is, to Fortran, the (F, N) matrix Aᵀ: trans 'N' gives Aᵀ A, and Fortran's upper
    # triangle of an (F, F) C-ordered block is C's lower one (for ssyrk's output and spotrf's factor alike)
    uplo, trans = np.array([ord("U")], np.uint8), np.array([ord("N")], np.uint8)
    dims = np.array([f, n, f, f], np.int32)  # n, k, lda, ldc
    scal = np.array([scale, 0.0], np.float32)  # alpha, beta
    status = np.zeros(1, np.int32)
    for c in range(curv.shape[0]):
        block = out[c]
        if sparse:
            block[:] = 0.0
            _sparse_gram(cols, vals, curv[c], block)
            for i in range(f):
                for j in range(i + 1):
                    block[i, j] *= scale
        else:
            for i in range(n):
                w = np.sqrt(curv[c, i])
                for j in range(f):
                    a[i, j] = w * x[i, j]
            syrk(ssyrk, uplo, trans, dims, scal, a, block)
        for i in range(f):
            block[i, i] += ridge[c]
        if factor:
            call_void(spotrf, (uplo.ctypes.data, dims[0:].ctypes.data, block.ctypes.data, dims[2:].ctypes.data,
                               status.ctypes.data))
            info[c] = status[0]
            for i in range(f):  # the factor is the lower triangle: zero the rest
                for j in range(i):
                    block[j, i] = 0.0
        else:
            for i in range(f):  # the lower triangle mirrored: a whole symmetric block
                for j in range(i):
                    block[j, i] = block[i, j]


def _grams(design: RowDesign, curvature, out, scale, ridge, factor) -> np.ndarray:
    x = design.xa
    c_float32("class blocks", curvature=curvature, out=out)
    if curvature.ndim != 2 or curvature.shape[1] != x.shape[0] \
            or out.shape != (curvature.shape[0], x.shape[1], x.shape[1]):
        raise ValueError(f"class blocks: shapes x {x.shape}, curvature {curvature.shape}, out {out.shape} "
                         "do not fit (N, F), (K, N), (K, F, F)")
    if not out.flags.writeable:
        raise ValueError("class blocks: out must be writeable")
    if not np.all(curvature >= 0):  # NaN fails this too
        raise ValueError("class blocks: curvature must be non-negative and finite (a NaN softmax?)")
    info = np.zeros(curvature.shape[0], np.int32)
    ridges = np.ascontiguousarray(np.broadcast_to(np.asarray(ridge, np.float32), (curvature.shape[0],)))
    _gram_kernel(x, design.cols, design.vals, design.sparse_build, curvature, np.float32(scale), ridges, factor,
                 out, info, *_lapack_addresses())
    return info


def weighted_grams(design: RowDesign, curvature: np.ndarray, out: np.ndarray, scale: float = 1.0,
                   ridge: float = 0.0) -> None:
    """``out[k] = scale · xᵀ diag(curvature[k]) x + ridge I`` for the design's ``x`` (N, F), ``curvature``
    (K, N) (non-negative) and ``out`` (K, F, F), float32 and C-ordered; ``out`` is written in place (both
    triangles)."""
    _grams(design, curvature, out, scale, ridge, False)


JITTER = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # shares of a block's mean diagonal, tried in turn


def class_factors(design: RowDesign, curvature: np.ndarray, out: np.ndarray, scale: float,
                  ridge: float) -> np.ndarray:
    """The lower Cholesky factors, in float32, of :func:`weighted_grams`'s blocks, in ``out`` (upper triangles
    zero). A block float32 cannot factor (``spotrf`` fails: its smallest eigenvalues, the penalty ``ridge`` where
    the design is rank-deficient, are below the rounding of its float32 sums, ~1e-7 of its diagonal) is factored
    again with ``ridge`` plus ``JITTER`` shares of its mean diagonal, the smallest that factors: a preconditioner
    needs to be positive definite, not exact. Returns the ridge each block was factored with (K,)."""
    k, f1 = curvature.shape[0], design.xa.shape[1]
    ridges = np.full(k, ridge, np.float32)
    info = _grams(design, curvature, out, scale, ridges, True)
    if info.any():
        x64 = design.xa.astype(np.float64)
        mean_diag = scale * (curvature.astype(np.float64) @ (x64 * x64).sum(axis=1)) / f1
        for share in JITTER:
            bad = np.flatnonzero(info)
            ridges[bad] = ridge + share * np.maximum(mean_diag[bad], np.finfo(np.float32).tiny)
            redo = np.empty((len(bad), f1, f1), np.float32)
            info[bad] = _grams(design, np.ascontiguousarray(curvature[bad]), redo, scale, ridges[bad], True)
            out[bad] = redo
            if not info.any():
                break
        else:
            raise FloatingPointError(f"class blocks {np.flatnonzero(info).tolist()} are not positive definite even "
                                     f"with {JITTER[-1] if JITTER else 0} x their mean diagonal added: an inf in the "
                                     "design?")
    return ridges


# 'reassoc' lets LLVM vectorise the substitutions' dot products; no nnan/ninf, so a NaN propagates
_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _precondition(chol, r, z, y):  # pragma: no cover - compiled
    # z = the class blocks' solve of r, class by class (L y = r_k, Lᵀ z_k = y), projected onto Σ_k z_k = 0
    f1, k = r.shape
    for c in range(k):
        low = chol[c]
        for i in range(f1):
            acc = r[i, c]
            row = low[i]
            for j in range(i):
                acc -= row[j] * y[j]
            y[i] = acc / row[i]
        for i in range(f1 - 1, -1, -1):  # back substitution by columns of Lᵀ: rows of L, contiguous
            zi = y[i] / low[i, i]
            z[i, c] = zi
            row = low[i]
            for j in range(i):
                y[j] -= zi * row[j]
    for i in range(f1):
        m = np.float32(0.0)
        for c in range(k):
            m += z[i, c]
        m /= k
        for c in range(k):
            z[i, c] -= m

@numba.njit(nogil=True, cache=True)
def _hess_vec(xa, xat, pn, v, lam, out):  # pragma: no cover - compiled
    n = xa.shape[0]
    f1, k = v.shape
    u = np.dot(xa, v)  # (N, K): u_n = V x_n
    for i in range(n):  # J v: p_nk (u_nk - p_nᵀ u_n)
        tot = np.float32(0.0)
        for c in range(k):
            u[i, c] *= pn[i, c]
            tot += u[i, c]
        for c in range(k):
            u[i, c] -= pn[i, c] * tot
    o = np.dot(xat, u)  # (F+1, K)
    inv_n = np.float32(1.0 / n)
    for j in range(f1 - 1):
        for c in range(k):
            out[j, c] = o[j, c] * inv_n + lam * v[j, c]
    for c in range(k):  # the bias: not penalised
        out[f1 - 1, c] = o[f1 - 1, c] * inv_n

@numba.njit(nogil=True, cache=True)
def _hess_vec_sparse(cols, vals, pn, v, lam, out):  # pragma: no cover - compiled
    # the same product on a design stored by rows' nonzero entries (ELL: padded entries have value 0)
    n, width = cols.shape
    f1, k = v.shape
    bias = f1 - 1
    out[:] = 0.0
    u = np.empty(k, np.float32)
    for i in range(n):
        for c in range(k):
            u[c] = v[bias, c]
        for a in range(width):
            j, x = cols[i, a], vals[i, a]
            for c in range(k):
                u[c] += x * v[j, c]
        tot = np.float32(0.0)
        for c in range(k):
            u[c] *= pn[i, c]
            tot += u[c]
        for c in range(k):
            u[c] -= pn[i, c] * tot
        for a in range(width):
            j, x = cols[i, a], vals[i, a]
            for c in range(k):
                out[j, c] += x * u[c]
        for c in range(k):
            out[bias, c] += u[c]
    inv_n = np.float32(1.0 / n)
    for j in range(bias):
        for c in range(k):
            out[j, c] = out[j, c] * inv_n + lam * v[j, c]
    for c in range(k):
        out[bias, c] *= inv_n


@numba.njit(nogil=True, cache=True)
def _cg(xa, xat, cols, vals, sparse, pn, chol, lam, b, goal, target, max_cg):  # pragma: no cover - compiled
    f1, k = b.shape
    d = np.zeros((f1, k), np.float32)
    r = b.copy()
    z = np.empty((f1, k), np.float32)
    y = np.empty(f1, np.float32)
    hs = np.empty((f1, k), np.float32)
    _precondition(chol, r, z, y)
    s = z.copy()
    rz = 0.0
    for i in range(f1):
        for c in range(k):
            rz += np.float64(r[i, c]) * z[i, c]
    products = 0
    for _ in range(max_cg):
        if sparse:
            _hess_vec_sparse(cols, vals, pn, s, lam, hs)
        else:
            _hess_vec(xa, xat, pn, s, lam, hs)
        products += 1
        shs = 0.0
        for i in range(f1):
            for c in range(k):
                shs += np.float64(s[i, c]) * hs[i, c]
        if not shs > 0:  # no positive curvature along s (rounding): stop with the step so far
            break
        alpha = np.float32(rz / shs)
        rr = 0.0
        rmax = np.float32(0.0)
        for i in range(f1):
            for c in range(k):
                d[i, c] += alpha * s[i, c]
                r[i, c] -= alpha * hs[i, c]
                rr += np.float64(r[i, c]) * r[i, c]
                rmax = max(rmax, abs(r[i, c]))
        # the residual is the gradient the quadratic model predicts after the step: stop once it is within
        # a fraction of the tolerance, or relatively small (the forcing term)
        if np.sqrt(rr) <= goal or rmax <= target:
            break
        _precondition(chol, r, z, y)
        rz_new = 0.0
        for i in range(f1):
            for c in range(k):
                rz_new += np.float64(r[i, c]) * z[i, c]
        beta = np.float32(rz_new / rz)
        for i in range(f1):
            for c in range(k):
                s[i, c] = z[i, c] + beta * s[i, c]
        rz = rz_new
    return d, products


def conjugate_gradients(
    design: RowDesign, p: np.ndarray, chol: np.ndarray, lam: float, b: np.ndarray, goal: float, target: float,
    max_cg: int,
) -> tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients on ``H d = b`` for one head, float32: ``design`` its design group,
    ``p`` (K, N) the softmax, ``chol`` (K, F+1, F+1) the class blocks' lower Cholesky factors (C order), ``lam``
    the per-sample L2 strength (the bias, last, unpenalised), ``b`` (K, F+1). Stops once the residual's norm is
    within ``goal`` or its largest entry within ``target``, after ``max_cg`` products, or where the curvature
    along a direction is not positive. Returns ``d`` (K, F+1) and the number of Hessian-vector products: the
    algorithm of the batched conjugate gradients in :mod:`.newton`, for one head."""
    c_float32("conjugate_gradients", chol=chol)
    k, f1 = b.shape
    if design.xa.shape[1] != f1 or p.shape != (k, design.xa.shape[0]) or chol.shape != (k, f1, f1):
        raise ValueError(f"conjugate_gradients: shapes xa {design.xa.shape}, p {p.shape}, chol {chol.shape}, "
                         f"b {b.shape} do not fit (N, F+1), (K, N), (K, F+1, F+1), (K, F+1)")
    d, products = _cg(
        design.xa, design.xat, design.cols, design.vals, design.sparse_products,
        np.ascontiguousarray(p.T, dtype=np.float32), chol, np.float32(lam), np.ascontiguousarray(b.T, dtype=np.float32),
        np.float64(goal), np.float32(target), int(max_cg))
    return np.ascontiguousarray(d.T), int(products)
