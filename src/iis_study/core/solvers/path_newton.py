"""The elastic-net path's proximal Newton (:mod:`~iis_study.core.scoring.weight_sparsity`), one concept set a
call, compiled by numba and run without the GIL (two sets' paths on two threads): :func:`proximal_newton`, the
whole solve of one path point on its working set; :func:`free_hessian`, a step's exact Hessian on its free
weights by BLAS ``ssyrk``; :func:`lasso_qp`, the step's L1 model minimised by coordinate descent and LAPACK
``dposv`` solves on its support. The steps' ~40 small torch operations cost as much as their products, and the
16-d layer's collinear concepts made coordinate descent alone hit its sweep cap at most steps
(docs/performance.md)."""

from __future__ import annotations

import numba
import numpy as np

from .blas import c_float32, gemm, posv, routine, syrk


@numba.njit(nogil=True, cache=True)
def _free_hessian_kernel(x, col, cls, prob, ridge, out, ssyrk):  # pragma: no cover - compiled
    # see free_hessian; h, the float32 sums, in C's lower triangle (Fortran's upper, as in _gram_kernel)
    n, q, k = x.shape[0], col.shape[0], prob.shape[1]
    uplo, trans = np.array([ord("U")], np.uint8), np.array([ord("N")], np.uint8)
    u = np.empty((n, q), np.float32)  # u_ij = x_i,col(j) p_i,cls(j)
    for i in range(n):
        for j in range(q):
            u[i, j] = x[i, col[j]] * prob[i, cls[j]]
    h = np.empty((q, q), np.float32)
    syrk(ssyrk, uplo, trans, np.array([q, n, q, q], np.int32), np.array([-1.0, 0.0], np.float32), u, h)  # -uᵀu
    members = np.empty(q, np.int64)
    one = np.array([1.0, 0.0], np.float32)
    for c in range(k):  # + the class block Σ_i p_ic x_i xᵢᵀ on the weights of class c
        size = 0
        for j in range(q):
            if cls[j] == c:
                members[size] = j
                size += 1
        if size == 0:
            continue
        v = np.empty((n, size), np.float32)
        for i in range(n):
            root = np.sqrt(prob[i, c])
            for a in range(size):
                v[i, a] = root * x[i, col[members[a]]]
        block = np.empty((size, size), np.float32)
        syrk(ssyrk, uplo, trans, np.array([size, n, size, size], np.int32), one, v, block)
        for a in range(size):
            for b in range(a + 1):
                h[members[a], members[b]] += block[a, b]  # members ascending: the lower triangle
    inv_n = 1.0 / n
    for i in range(q):
        for j in range(i + 1):
            out[i, j] = np.float64(h[i, j]) * inv_n
            out[j, i] = out[i, j]
        out[i, i] += ridge[i]


def free_hessian(x: np.ndarray, col: np.ndarray, cls: np.ndarray, prob: np.ndarray, ridge: np.ndarray,
                 out: np.ndarray) -> None:
    """The multinomial cross-entropy's Hessian on ``Q`` chosen weights, written into ``out`` (Q, Q), float64:
    ``out[j, j'] = Σᵢ x_i,col(j) x_i,col(j') (δ_cls(j)cls(j') p_i,cls(j) − p_i,cls(j) p_i,cls(j')) / N + ridge_j δ_jj'``
    — weight ``j`` the coefficient of design column ``col[j]`` in class ``cls[j]``. ``x`` (N, F) and ``prob``
    (N, K) (the softmax) float32 and C-ordered; the sums in float32 by BLAS ``ssyrk``: ``−uᵀu`` with
    ``u_ij = x_i,col(j) p_i,cls(j)`` (one triangle) and each class's block on its own columns (a K-th of the
    square), ~3x fewer flops than two products of the whole square (the elastic-net path's Newton steps,
    :mod:`~iis_study.core.scoring.weight_sparsity`)."""
    c_float32("free_hessian", x=x, prob=prob)
    q = col.shape[0]
    if col.shape != cls.shape or x.shape[0] != prob.shape[0] or out.shape != (q, q) or ridge.shape != (q,) \
            or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"free_hessian: shapes x {x.shape}, col {col.shape}, cls {cls.shape}, prob {prob.shape}, "
                         f"ridge {ridge.shape}, out {out.shape} {out.dtype} do not fit (N, F), (Q,), (Q,), (N, K), "
                         "(Q,), C-ordered float64 (Q, Q)")
    if q == 0:
        return
    if col.min() < 0 or col.max() >= x.shape[1] or cls.min() < 0 or cls.max() >= prob.shape[1]:
        raise ValueError("free_hessian: col or cls out of range")
    _free_hessian_kernel(x, col.astype(np.int64), cls.astype(np.int64), prob, ridge.astype(np.float64), out,
                         routine("ssyrk"))


@numba.njit(nogil=True, cache=True)
def _lasso_qp_kernel(hess, grad, start, l1, penalised, forcing, max_sweeps, refine_after, max_solves,
                     dposv):  # pragma: no cover - compiled
    sets, width = grad.shape
    step = np.zeros((sets, width))
    support = np.empty(width, np.int64)
    sub = np.empty(width * width)
    rhs = np.empty(width)
    uplo = np.array([ord("U")], np.uint8)
    ints = np.zeros(5, np.int32)
    for r in range(sets):
        h2, st, start_r = hess[r], step[r], start[r]
        moved = np.zeros(width)  # H d
        solves = 0
        for sweep in range(max_sweeps):
            biggest = 0.0
            changed = False
            for q in range(width):
                h = h2[q, q]
                old = start_r[q] + st[q]
                u = old - (grad[r, q] + moved[q]) / h
                if penalised[r, q]:
                    cut = l1[r] / h
                    new = u - cut if u > cut else (u + cut if u < -cut else 0.0)
                else:
                    new = u
                delta = new - old
                if delta != 0.0:
                    changed |= (old == 0.0) != (new == 0.0)
                    st[q] += delta
                    for j in range(width):
                        moved[j] += h2[q, j] * delta
                    biggest = max(biggest, abs(delta) * h)
            if biggest <= forcing[r]:
                break
            if changed or sweep + 1 < refine_after or solves >= max_solves:
                continue
            # the support stayed: solve the model on it with the signs fixed (x_S = H_SS⁻¹ (H_S· start - g_S -
            # l1 sign_S), the other weights at 0); where a weight would cross zero, stop there, drop it, solve again
            while solves < max_solves:
                ns = 0
                for q in range(width):
                    if not penalised[r, q] or start_r[q] + st[q] != 0.0:
                        support[ns] = q
                        ns += 1
                for i in range(ns):
                    qi = support[i]
                    for j in range(ns):
                        sub[i * ns + j] = h2[qi, support[j]]
                    t = -grad[r, qi]
                    for j in range(width):
                        t += h2[qi, j] * start_r[j]
                    if penalised[r, qi]:
                        t -= l1[r] if start_r[qi] + st[qi] > 0.0 else -l1[r]
                    rhs[i] = t
                ints[0], ints[1], ints[2], ints[3], ints[4] = ns, 1, ns, ns, 0
                posv(dposv, uplo, ints, sub, rhs)
                solves += 1
                if ints[4] != 0:  # not positive definite in float64: coordinate descent alone
                    solves = max_solves
                    break
                theta, hit = 1.0, -1
                for i in range(ns):
                    qi = support[i]
                    x = start_r[qi] + st[qi]
                    if penalised[r, qi] and x * rhs[i] <= 0.0:
                        crossing = x / (x - rhs[i])
                        if crossing < theta:
                            theta, hit = crossing, qi
                for i in range(ns):
                    qi = support[i]
                    x = start_r[qi] + st[qi]
                    st[qi] = x + theta * (rhs[i] - x) - start_r[qi]
                if hit < 0:
                    break
                st[hit] = -start_r[hit]  # exactly zero
            for j in range(width):
                t = 0.0
                for q in range(width):
                    t += h2[j, q] * st[q]
                moved[j] = t
    return step


def lasso_qp(hess: np.ndarray, grad: np.ndarray, start: np.ndarray, l1: np.ndarray, penalised: np.ndarray,
             forcing: np.ndarray, max_sweeps: int, refine_after: int, max_solves: int) -> np.ndarray:
    """Per set ``r``, the step ``d`` minimising the model ``gᵀd + ½dᵀHd + l1_r·Σ_{penalised q} |start_q + d_q|``
    (``hess`` (R, Q, Q) symmetric positive definite, float64; ``grad``, ``start`` (R, Q); ``l1``, ``forcing`` (R,)).

    Cyclic coordinate descent (glmnet's and liblinear's inner solver), sweeping until no coordinate moved the
    model's gradient by more than ``forcing[r]`` (or ``max_sweeps``). On collinear columns coordinate descent
    crawls (hundreds of sweeps a step on a 16-d layer's 200 concepts), so once a sweep past ``refine_after``
    leaves the support unchanged, the model is solved exactly on the support with its signs fixed (LAPACK
    ``dposv``); a weight that would cross zero stops the move there and leaves the support, and the solve is
    repeated (an active-set step; at most ``max_solves`` solves per set). Every such move lowers the model (it
    is the smooth quadratic on that orthant's face), and the sweeps' stopping rule is unchanged: the next sweep
    checks every coordinate, the zeros included."""
    sets, width = grad.shape
    if hess.shape != (sets, width, width) or start.shape != (sets, width) or penalised.shape != (sets, width) \
            or l1.shape != (sets,) or forcing.shape != (sets,):
        raise ValueError(f"lasso_qp: shapes hess {hess.shape}, grad {grad.shape}, start {start.shape}, "
                         f"penalised {penalised.shape}, l1 {l1.shape}, forcing {forcing.shape} do not fit")
    return _lasso_qp_kernel(np.ascontiguousarray(hess, np.float64), grad, start, l1, penalised, forcing,
                            int(max_sweeps), int(refine_after), int(max_solves), routine("dposv"))


@numba.njit(nogil=True, cache=True)
def _path_objective(z, labels, w, l1, l2):  # pragma: no cover - compiled
    # mean cross-entropy of the logits z (K, N) + l1 ‖W‖₁ + l2/2 ‖W‖², float64
    k, n = z.shape
    ce = 0.0
    for i in range(n):
        top = z[0, i]
        for c in range(1, k):
            top = max(top, z[c, i])
        tot = 0.0
        for c in range(k):
            tot += np.exp(z[c, i] - top)
        ce += top + np.log(tot) - z[labels[i], i]
    absolute, square = 0.0, 0.0
    for c in range(w.shape[0]):  # loops, not array expressions: each of those is compiled on its own (slow)
        for j in range(w.shape[1]):
            absolute += abs(w[c, j])
            square += w[c, j] * w[c, j]
    return ce / n + l1 * absolute + 0.5 * l2 * square


@numba.njit(nogil=True, cache=True)
def _logits(w, b, at, dgemm, trans, dims, scal):  # pragma: no cover - compiled
    z = np.empty((w.shape[0], at.shape[1]))
    gemm(dgemm, trans, dims, scal, w, at, z)
    for c in range(z.shape[0]):
        z[c] += b[c]
    return z


@numba.njit(nogil=True, cache=True)
def _proximal_newton_kernel(a, at, a_ext, labels, w, b, l1, l2, tol, max_steps, forcing, sweeps, refine_after,
                            max_solves, ssyrk, dposv, dgemm):  # pragma: no cover - compiled
    # see proximal_newton; w (K, M) and b (K,) are updated in place
    n, m = a.shape
    k = w.shape[0]
    trans, dims, scal = np.array([ord("N")], np.uint8), np.zeros(6, np.int32), np.zeros(2)  # dgemm's work arrays
    z = _logits(w, b, at, dgemm, trans, dims, scal)
    f = _path_objective(z, labels, w, l1, l2)
    prob = np.empty((k, n))
    diff = np.empty((k, n))
    p32 = np.empty((n, k), np.float32)
    gw = np.empty((k, m))
    gb = np.empty(k)
    col = np.empty(k * m + k, np.int64)
    cls = np.empty(k * m + k, np.int64)
    res, steps = np.inf, 0
    for step in range(max_steps + 1):
        for i in range(n):  # the softmax over classes, and its difference from the one-hot labels
            top = z[0, i]
            for c in range(1, k):
                top = max(top, z[c, i])
            tot = 0.0
            for c in range(k):
                prob[c, i] = np.exp(z[c, i] - top)
                tot += prob[c, i]
            for c in range(k):
                prob[c, i] /= tot
                p32[i, c] = prob[c, i]
        for c in range(k):
            for i in range(n):
                diff[c, i] = prob[c, i]
        for i in range(n):
            diff[labels[i], i] -= 1.0
        gemm(dgemm, trans, dims, scal, diff, a, gw)
        res = 0.0
        for c in range(k):
            tot = 0.0
            for i in range(n):
                tot += diff[c, i]
            gb[c] = tot / n
            res = max(res, abs(gb[c]))
            for j in range(m):
                g = gw[c, j] / n + l2 * w[c, j]
                gw[c, j] = g
                if w[c, j] != 0.0:
                    res = max(res, abs(g + (l1 if w[c, j] > 0 else -l1)))
                else:
                    res = max(res, abs(g) - l1)
        if res <= tol or step == max_steps:
            break
        steps += 1
        width = 0  # the free weights, class by class, then the K biases (design column m: the ones)
        for c in range(k):
            for j in range(m):
                if w[c, j] != 0.0 or abs(gw[c, j]) - l1 > tol:
                    col[width], cls[width] = j, c
                    width += 1
        q = width + k
        for c in range(k):
            col[width + c], cls[width + c] = m, c
        ridge = np.empty(q)
        grad = np.empty((1, q))
        start = np.empty((1, q))
        penalised = np.zeros((1, q), np.bool_)
        for e in range(q):
            if e < width:
                ridge[e], grad[0, e], start[0, e] = l2, gw[cls[e], col[e]], w[cls[e], col[e]]
                penalised[0, e] = True
            else:
                ridge[e], grad[0, e], start[0, e] = 1e-10, gb[e - width], b[e - width]
        hess = np.empty((q, q))
        _free_hessian_kernel(a_ext, col[:q], cls[:q], p32, ridge, hess, ssyrk)
        d = _lasso_qp_kernel(hess.reshape(1, q, q), grad, start, np.array([l1]), penalised,
                             np.array([forcing * res]), sweeps, refine_after, max_solves, dposv)[0]
        d_w = np.zeros((k, m))
        for e in range(width):
            d_w[cls[e], col[e]] = d[e]
        d_b = d[width:]
        # the model's decrease (< 0 unless at the optimum): gᵀd + l1 (‖W + d‖₁ - ‖W‖₁)
        linear, l1_new, l1_now = 0.0, 0.0, 0.0
        for c in range(k):
            for j in range(m):
                linear += gw[c, j] * d_w[c, j]
                l1_new += abs(w[c, j] + d_w[c, j])
                l1_now += abs(w[c, j])
        bias = 0.0
        for c in range(k):
            bias += gb[c] * d_b[c]
        decrease = linear + bias + l1 * (l1_new - l1_now)
        if not decrease < 0.0:
            break  # no descent direction: left to FISTA
        t, moved = 1.0, False
        cand, cand_b = np.empty((k, m)), np.empty(k)
        for _ in range(40):  # Armijo backtracking on the whole objective
            same = True
            for c in range(k):
                for j in range(m):
                    cand[c, j] = w[c, j] + t * d_w[c, j]
                    same &= cand[c, j] == w[c, j]
                cand_b[c] = b[c] + t * d_b[c]
                same &= cand_b[c] == b[c]
            z_c = _logits(cand, cand_b, at, dgemm, trans, dims, scal)
            f_c = _path_objective(z_c, labels, cand, l1, l2)
            if f_c <= f + 1e-4 * t * decrease:
                # a step that rounds back to (w, b) (its decrease below the objective's rounding) is no step
                moved = not same
                w[:], b[:], z, f = cand, cand_b, z_c, f_c
                break
            t *= 0.5
        if not moved:  # no step lowers the objective: left where it is (to FISTA)
            break
    return res, steps


def proximal_newton(a: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray, l1: float, l2: float,
                    tolerance: float, max_steps: int, forcing: float, sweeps: int, refine_after: int,
                    max_solves: int) -> tuple[float, int]:
    """One set's elastic-net logistic regression ``mean CE + l1‖W‖₁ + l2/2‖W‖²`` by proximal Newton from
    ``(w, b)`` (updated in place): ``a`` (N, M) float64 design, ``labels`` (N,), ``w`` (K, M), ``b`` (K,)
    float64. Each step: the exact Hessian on the free weights and the biases (:func:`free_hessian`), the L1
    model minimised to ``forcing`` x the residual (:func:`lasso_qp`), Armijo backtracking on the whole
    objective. Stops once the residual (the largest entry of the minimum-norm subgradient, the bias gradient
    included) is within ``tolerance``, after ``max_steps``, or where no step lowers the objective. Returns the
    residual at the returned point and the steps taken."""
    n, m = a.shape
    if w.ndim != 2 or w.shape[1] != m or b.shape != (w.shape[0],) or labels.shape != (n,) \
            or a.dtype != np.float64 or w.dtype != np.float64 or b.dtype != np.float64 \
            or not (w.flags.c_contiguous and w.flags.writeable and b.flags.writeable):
        raise ValueError(f"proximal_newton: a {a.shape} {a.dtype}, labels {labels.shape}, w {w.shape} {w.dtype}, "
                         f"b {b.shape} {b.dtype} do not fit float64 (N, M), (N,), (K, M) C-ordered, (K,), writeable")
    if n and (labels.min() < 0 or labels.max() >= w.shape[0]):
        raise ValueError(f"proximal_newton: labels must be in [0, {w.shape[0]}), got {labels.min()} … {labels.max()}")
    a = np.ascontiguousarray(a)
    a_ext = np.ascontiguousarray(np.hstack([a, np.ones((n, 1))]), dtype=np.float32)  # [a, 1]: column m the bias
    res, steps = _proximal_newton_kernel(
        a, np.ascontiguousarray(a.T), a_ext, labels.astype(np.int64), w, b, float(l1), float(l2), float(tolerance),
        int(max_steps), float(forcing), int(sweeps), int(refine_after), int(max_solves), routine("ssyrk"),
        routine("dposv"), routine("dgemm"))
    return float(res), int(steps)
