"""Batched multinomial logistic regression solved to a certified optimum (METHOD §4, "The estimator").

Many independent problems, one per *head*, are solved together. A head ``(g, l)`` reads the design
matrix of group ``g`` (``X_g``, N x F: the masked concept activations of one sparsity, or the centred
features for the probe) and has its own L2 strength ``C_l``; it minimises

    f(W, b) = (1/N) Σ_n CE(W x_gn + b, y_n) + ‖W‖² / (2 C_l N)

(scikit-learn's ``C · Σ CE + ½‖W‖²`` divided by ``C·N``; the bias is not penalised). For every ``C_l``
the problem is strictly convex in ``W`` (the penalty) and convex in ``b``: one optimum up to the
softmax's shift of ``b`` along the all-ones direction, which no prediction sees.

The solver is L-BFGS (two-loop recursion, ``history`` pairs) with a per-head backtracking
(Armijo) line search, vectorised over heads: one evaluation of the objective computes the loss
and gradient of every head still running in two batched matrix products per row block. Each head
stops when the largest entry of its gradient, computed in float64, is at most ``tol``: that number
is the head's certificate. A head that reaches ``max_iter`` (or whose line search can no longer
decrease its loss) first is reported uncertified, with its final gradient. Groups whose heads have
all stopped drop out of the computation.

The design is given by a :class:`Design`: an object that yields ``(X, y)`` row blocks for a
subset of its groups, so a large training set is streamed block by block (bounded memory) and a
small one is materialised once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from ..device import check_workers, worker_pool
from . import newton

SOLVERS = ("newton", "lbfgs")  # sweep.solver: the inner solver of one L2 strength

logger = logging.getLogger(__name__)

ARMIJO = 1e-4
MAX_LINE_SEARCH = 40
COMPACT_AT = 0.75
BLOCK_BYTES = 256 * 2**20  # a streamed design's block: its per-head work arrays stay below this
PRECOND_SCALE = 0.3  # times 1/K: the softmax curvature the preconditioner assumes


class Design(Protocol):
    """Row blocks of a batch of design matrices."""

    n: int  # rows (samples)
    groups: int  # G
    features: int  # F

    def blocks(
        self, groups: torch.Tensor, dtype: torch.dtype, max_rows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(X (len(groups), B, F), y (B,))`` blocks covering the N rows once, in order; a streamed
        design yields at most ``max_rows`` rows a block."""
        ...


@dataclass
class LogisticFit:
    """The solution of every head: ``weight`` (G, L, K, F), ``bias`` (G, L, K) in float64; ``grad``
    (G, L): the largest absolute gradient entry at the solution (float64); ``iterations`` (G, L);
    ``loss`` (G, L); ``certified`` (G, L): ``grad <= tol``; ``tol``."""

    weight: torch.Tensor
    bias: torch.Tensor
    grad: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor
    certified: torch.Tensor
    tol: float
    solved: torch.Tensor | None = None  # (G, L): heads the path reached (all when no path rule)
    products: torch.Tensor | None = None  # (G, L): Hessian-vector products (the Newton solver)


def objective(
    design: Design,
    theta: torch.Tensor,
    groups: torch.Tensor,
    inv_cn: torch.Tensor,
    num_classes: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (G', L) and gradient (G', L, K·(F+1)) in float64 of the heads of ``groups``; ``theta``
    is (G', L, K·(F+1)) in float64 (row-major ``[W | b]`` per class)."""
    g_, n_c = theta.shape[0], theta.shape[1]
    k = num_classes
    f = design.features
    th = theta.view(g_, n_c, k, f + 1)
    w = th[..., :f]
    wm = w.to(dtype).permute(0, 3, 1, 2).reshape(g_, f, n_c * k)  # (G', F, L·K)
    b = th[..., f].to(dtype).reshape(g_, 1, n_c * k)
    loss = torch.zeros(g_, n_c, dtype=torch.float64, device=theta.device)
    g_w = torch.zeros(g_, f, n_c * k, dtype=torch.float64, device=theta.device)
    g_b = torch.zeros(g_, n_c * k, dtype=torch.float64, device=theta.device)
    max_rows = max(64, BLOCK_BYTES // (8 * 3 * g_ * n_c * k))  # logits, softmax and gradient of one block
    for x, y in design.blocks(groups, dtype, max_rows):
        rows = x.shape[1]
        z = torch.baddbmm(b, x, wm).view(g_, rows, n_c, k)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        idx = y.view(1, rows, 1, 1).expand(g_, rows, n_c, 1)
        loss += (lse - z.gather(-1, idx)).squeeze(-1).sum(1, dtype=torch.float64)
        r = torch.exp_(z.sub_(lse))  # softmax, in place
        r.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=r.dtype, device=r.device))
        r = r.view(g_, rows, n_c * k)
        g_w += torch.bmm(x.transpose(1, 2), r).to(torch.float64)
        g_b += r.sum(1, dtype=torch.float64)
    n = float(design.n)
    reg = inv_cn.view(1, n_c, 1, 1)
    loss = loss / n + 0.5 * (reg.view(1, n_c) * (w * w).sum((-1, -2)))
    grad = torch.empty_like(th)
    grad[..., :f] = g_w.view(g_, f, n_c, k).permute(0, 2, 3, 1) / n + reg * w
    grad[..., f] = g_b.view(g_, n_c, k) / n
    return loss, grad.view(g_, n_c, -1)


def gram_matrices(design: Design, groups: torch.Tensor) -> torch.Tensor:
    """``[X 1]ᵀ[X 1]`` of every group (G, F+1, F+1), float64."""
    gram = None
    for x, _ in design.blocks(groups, torch.float64):
        ones = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
        xa = torch.cat([x, ones], dim=-1)
        part = torch.bmm(xa.transpose(1, 2), xa)
        gram = part if gram is None else gram + part
    assert gram is not None
    return gram


def preconditioners(gram: torch.Tensor, n: int, inv_cn: torch.Tensor, scale: float) -> torch.Tensor:
    """Per head (G, L), the inverse of ``scale · [X 1]ᵀ[X 1] / N + λ_l · diag(1, ..., 1, 0)``: the Gauss-Newton
    Hessian of the head's objective with the softmax's curvature replaced by a constant. L-BFGS starts its
    two-loop recursion from it, so the correlated concept activations do not set the number of iterations."""
    f = gram.shape[-1] - 1
    ridge = torch.ones(f + 1, dtype=torch.float64, device=gram.device)
    ridge[f] = 0.0
    p = (gram * (scale / n)).unsqueeze(1) + inv_cn.view(1, -1, 1, 1) * torch.diag(ridge)  # (G, L, F+1, F+1)
    p.diagonal(dim1=-2, dim2=-1).add_(1e-10 * p.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + 1e-12)
    # LAPACK's factorisation rounds differently on 1 and 2 threads, and the preconditioner sets the solver's
    # path: computed on one thread, the same inputs give the same iterates (and the same IIS) on any count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(p))
    finally:
        torch.set_num_threads(threads)


def _apply(pinv: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """``P⁻¹`` of each head applied to its ``[W | b]`` rows: ``v`` (G', L, K·(F+1))."""
    g_, n_c, n = v.shape
    return torch.matmul(v.view(g_, n_c, k, n // k), pinv).view(g_, n_c, n)


def solve_logistic(
    design: Design,
    num_classes: int,
    cs: Sequence[float],
    *,
    tol: float = 1e-5,
    max_iter: int = 2000,
    history: int = 10,
    device: torch.device | str = "cpu",
    keep_going: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    solver: str = "newton",
    nested: bool = True,
    workers: int | None = None,
) -> LogisticFit:
    """Solve every head of ``design`` x ``cs`` to ``tol`` (see the module docstring).

    The L2 strengths are visited in order of decreasing penalty (increasing ``C``), each group's
    solution warm-starting the next. ``keep_going(l, weight (G', K, F), bias (G', K), groups (G',))``,
    called after strength ``l`` with the solutions of the groups still on the path, returns which of
    them go on to the next strength (the default: all); a head not solved has NaN weights and
    gradient and ``solved`` false. Products and the certificate are float64.

    ``solver``: ``newton`` (the truncated Newton of :mod:`.newton`, where the design is materialised and has
    at most ``newton.MAX_FEATURES`` columns with its bias; else, e.g. a probe on 1,280 features or a streamed
    design, L-BFGS) or ``lbfgs``. ``iterations`` counts Newton steps or L-BFGS
    iterations; ``products`` the Hessian-vector products (Newton).

    ``nested``: the Newton solver's first (strongest) penalty, which has no solution of a stronger one to start
    from, starts each group from the solution of its parent in ``design.nested_parents()`` where the design has
    them (:class:`~iis_study.core.heads.convex.ConceptDesign`: the head at the next lower sparsity, whose kept set
    contains this one's), the groups solved level by level, roots from zero (measured on the default study's
    Lite0: 37 Hessian-vector products a head at C = 0.1 against 61 from zero, docs/performance.md). The optimum
    does not depend on the start; the certificate is the same.

    ``workers``: on the CPU the Newton solver solves one head per call, ``workers`` heads at a time on as many
    Python threads, each running torch on one thread (:func:`~iis_study.core.device.worker_pool`; default:
    ``torch.get_num_threads()``). One head's class blocks (1.6 MB at M = 200, K = 10) and design stay in cache
    where a batch of hundreds streams them from memory (``scripts/bench_solvers.py`` times the pooled against the
    batched form, docs/performance.md); and a head solved alone on one thread rounds the same whatever the batch
    and the thread count, so the result does not depend on ``workers``. On a GPU the heads of a level run as one
    batch; L-BFGS (wide or streamed designs) always does.
    """
    if solver not in SOLVERS:
        raise ValueError(f"sweep.solver must be one of {SOLVERS}, got {solver!r}")
    cs = [float(c) for c in cs]
    if not cs or any(not (c > 0) for c in cs):
        raise ValueError(f"the L2 grid (inverse strengths C) must be > 0, got {tuple(cs)}")
    check_workers(workers)
    if tol <= 0 or max_iter < 1 or history < 1:
        raise ValueError(f"need tol > 0, max_iter >= 1, history >= 1; got {tol}, {max_iter}, {history}")
    dev = torch.device(device)
    f64 = torch.float64
    k, f, n_g, n_c = int(num_classes), design.features, design.groups, len(cs)
    order = sorted(range(n_c), key=lambda i: cs[i])  # strongest penalty first: each solution warm-starts the next
    inv_cn_all = torch.tensor([1.0 / (c * design.n) for c in cs], dtype=f64, device=dev)
    theta = torch.full((n_g, n_c, k * (f + 1)), math.nan, dtype=f64, device=dev)
    iters = torch.zeros(n_g, n_c, dtype=torch.long, device=dev)
    loss = torch.full((n_g, n_c), math.nan, dtype=f64, device=dev)
    gmax = torch.full((n_g, n_c), math.nan, dtype=f64, device=dev)
    groups = torch.arange(n_g, device=dev)
    dense = newton.dense_design(design, groups, k) if solver == "newton" and f + 1 <= newton.MAX_FEATURES else None
    products = torch.zeros(n_g, n_c, dtype=torch.long, device=dev)
    gram = gram_matrices(design, groups) if dense is None else None
    start = torch.zeros(n_g, 1, k * (f + 1), dtype=f64, device=dev)
    with worker_pool(workers) if dense is not None and dev.type == "cpu" else nullcontext() as pool:
        for step, li in enumerate(order):
            inv_cn = inv_cn_all[li : li + 1]
            th = start.clone()
            it_l = torch.zeros(len(groups), 1, dtype=torch.long, device=dev)
            stalled = torch.zeros(len(groups), 1, dtype=torch.bool, device=dev)
            if dense is not None:
                flat = th.view(len(groups), k, f + 1)
                prod_l = torch.zeros(len(groups), dtype=torch.long, device=dev)
                parents = getattr(design, "nested_parents", None) if nested and step == 0 else None
                for idx, parent in nested_levels(parents() if parents is not None else None, len(groups), dev):
                    sub = flat[idx] if parent is None else flat[parent]  # a copy (advanced indexing)
                    it_s, st_s = torch.zeros_like(it_l[idx, 0]), torch.zeros_like(stalled[idx, 0])
                    pr_s = torch.zeros_like(prod_l[idx])
                    newton_heads(pool, dense, sub, groups[idx], float(inv_cn[0]), tol, int(max_iter), it_s, st_s, pr_s)
                    flat[idx], it_l[idx, 0], stalled[idx, 0], prod_l[idx] = sub, it_s, st_s, pr_s
                products[groups, li] = prod_l
                if progress is not None:
                    progress(int(it_l.sum()))
            else:
                pinv = preconditioners(gram[groups], design.n, inv_cn, PRECOND_SCALE / k)
                _lbfgs(design, th, groups, inv_cn, k, tol, int(max_iter), history, it_l, stalled, pinv, progress)
            l_final, g_final = objective(design, th, groups, inv_cn, k, f64)  # the certificate, float64
            theta[groups, li] = th[:, 0]
            iters[groups, li] = it_l[:, 0]
            loss[groups, li] = l_final[:, 0]
            gmax[groups, li] = g_final.abs().amax(-1)[:, 0]
            if step + 1 == n_c:
                break
            go = torch.ones(len(groups), dtype=torch.bool, device=dev)
            if keep_going is not None:
                w = th.view(len(groups), k, f + 1)
                go = keep_going(li, w[..., :f], w[..., f], groups).to(dev)
            groups, start = groups[go], th[go]
            if groups.numel() == 0:
                break
    th = theta.view(n_g, n_c, k, f + 1)
    solved = ~torch.isnan(gmax)
    return LogisticFit(
        weight=th[..., :f].clone(),
        bias=th[..., f].clone(),
        grad=gmax,
        iterations=iters,
        loss=loss,
        certified=solved & (gmax <= tol),
        tol=float(tol),
        solved=solved,
        products=products,
    )


def newton_heads(
    pool: ThreadPoolExecutor | None, dense: newton.DenseDesign, theta: torch.Tensor, groups: torch.Tensor, lam: float,
    tol: float, max_iter: int, iters: torch.Tensor, stalled: torch.Tensor, products: torch.Tensor,
) -> None:
    """:func:`.newton.newton` on the heads ``theta`` (H, K, F+1) in place: one batch without a ``pool``, else one
    head per call on the pool's threads (each at one torch thread; see :func:`solve_logistic`'s ``workers``)."""
    if pool is None:
        newton.newton(dense, theta, groups, lam, tol, max_iter, iters, stalled, products)
        return
    # each call writes its own rows of theta, iters, stalled and products (views of one head); a worker's
    # torch.set_num_threads(1) (OpenMP's and MKL's) holds for that thread only
    jobs = [
        pool.submit(newton.newton, dense, theta[h : h + 1], groups[h : h + 1], lam, tol, max_iter,
                    iters[h : h + 1], stalled[h : h + 1], products[h : h + 1])
        for h in range(theta.shape[0])
    ]
    for job in jobs:
        job.result()


def nested_levels(
    parents: torch.Tensor | None, n: int, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The groups ``0 … n-1`` in levels of the forest ``parents`` (``parents[g]``: the group whose solution starts
    ``g``, -1 for a root): ``[(groups, their parents or None for the roots), …]``, each level after its parents'.
    ``parents`` None: one level of every group, from the given start."""
    if parents is None:
        return [(torch.arange(n, device=device), None)]
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    if parents.shape != (n,) or bool(((parents < -1) | (parents >= n)).any()):
        raise ValueError(f"nested parents must be {n} group indices or -1, got {parents.tolist()}")
    depth = torch.full((n,), -1, dtype=torch.long)
    for _ in range(n + 1):
        todo = depth < 0
        if not bool(todo.any()):
            break
        ready = todo & ((parents < 0) | (depth[parents.clamp(min=0)] >= 0))
        depth[ready] = torch.where(parents[ready] < 0, 0, depth[parents[ready].clamp(min=0)] + 1)
    if bool((depth < 0).any()):
        raise ValueError(f"nested parents contain a cycle: {parents.tolist()}")
    levels = []
    for d in range(int(depth.max()) + 1):
        idx = (depth == d).nonzero().flatten()
        levels.append((idx.to(device), None if d == 0 else parents[idx].to(device)))
    return levels


def _lbfgs(
    design: Design,
    theta: torch.Tensor,
    rows: torch.Tensor,
    inv_cn: torch.Tensor,
    k: int,
    tol: float,
    max_iter: int,
    m: int,
    iters: torch.Tensor,
    stalled: torch.Tensor,
    pinv: torch.Tensor,
    progress,
) -> int:
    """Preconditioned L-BFGS on ``theta`` (G', L, n) in place, the heads of design groups ``rows``
    (G',), float64; returns the iterations run. The state of the groups still running is kept compact (copied when
    a quarter of them have finished), so an iteration costs about what its live groups cost."""
    n_g, n_c, n = theta.shape
    dev = theta.device
    live = torch.arange(n_g, device=dev)
    x = theta.clone()
    dtype = torch.float64
    f, g = objective(design, x, rows[live], inv_cn, k, dtype)
    stop = stalled.clone()
    its = torch.zeros(n_g, n_c, dtype=torch.long, device=dev)
    s_mem = torch.zeros(m, n_g, n_c, n, dtype=torch.float64, device=dev)
    y_mem = torch.zeros_like(s_mem)
    rho = torch.zeros(m, n_g, n_c, dtype=torch.float64, device=dev)
    gamma = torch.ones(n_g, n_c, dtype=torch.float64, device=dev)
    filled, ptr, it = 0, 0, 0

    def write_back() -> None:
        theta[live] = x
        stalled[live] = stop
        iters[live] += its

    for it in range(1, max_iter + 1):
        act = (g.abs().amax(-1) > tol) & ~stop
        keep = act.any(-1)
        n_keep = int(keep.sum())
        # a quarter of the groups are done (or all): write them back and compact the state (compacting on every
        # finished group would copy the design's live groups once per group; the done ones cost a product meanwhile)
        if n_keep == 0 or n_keep <= COMPACT_AT * live.numel():
            write_back()
            idx = keep.nonzero().squeeze(1)
            live, x, f, g, stop, act, gamma, pinv = (t[idx] for t in (live, x, f, g, stop, act, gamma, pinv))
            its = torch.zeros_like(act, dtype=torch.long)
            s_mem, y_mem, rho = s_mem[:, idx], y_mem[:, idx], rho[:, idx]
            if live.numel() == 0:
                return it - 1
        order = [(ptr - 1 - j) % m for j in range(filled)]  # newest first
        q = g.clone()
        alphas = []
        for j in order:
            a = rho[j] * (s_mem[j] * q).sum(-1)
            q -= a.unsqueeze(-1) * y_mem[j]
            alphas.append(a)
        r = gamma.unsqueeze(-1) * _apply(pinv, q, k)
        for j, a in zip(reversed(order), reversed(alphas)):
            beta = rho[j] * (y_mem[j] * r).sum(-1)
            r += s_mem[j] * (a - beta).unsqueeze(-1)
        d = -r
        gd = (g * d).sum(-1)
        steep = gd >= 0  # not a descent direction (rounding, far from the optimum): preconditioned gradient
        if bool(steep.any()):
            pg = _apply(pinv, g, k)
            d = torch.where(steep.unsqueeze(-1), -pg, d)
            gd = torch.where(steep, -(g * pg).sum(-1), gd)
        d = d * act.unsqueeze(-1)
        gd = gd * act
        t = torch.ones_like(f)
        done = ~act
        x1, f1, g1 = x.clone(), f.clone(), g.clone()
        for _ in range(MAX_LINE_SEARCH):
            trial = x + t.unsqueeze(-1) * d
            ft, gt = objective(design, trial, rows[live], inv_cn, k, dtype)
            ok = ~done & torch.isfinite(ft) & (ft <= f + ARMIJO * t * gd)
            x1 = torch.where(ok.unsqueeze(-1), trial, x1)
            f1 = torch.where(ok, ft, f1)
            g1 = torch.where(ok.unsqueeze(-1), gt, g1)
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        failed = ~done  # no decrease found: at this precision the head cannot move further
        stop = stop | failed
        sv = x1 - x
        yv = g1 - g
        sy = (sv * yv).sum(-1)
        yy = (yv * _apply(pinv, yv, k)).sum(-1)
        upd = act & ~failed & (sy > 0) & (yy > 0)
        u = upd.unsqueeze(-1)
        s_mem[ptr] = torch.where(u, sv, 0.0)
        y_mem[ptr] = torch.where(u, yv, 0.0)
        rho[ptr] = torch.where(upd, 1.0 / torch.where(upd, sy, 1.0), 0.0)
        gamma = torch.where(upd, sy / torch.where(upd, yy, 1.0), gamma)
        ptr = (ptr + 1) % m
        filled = min(filled + 1, m)
        x, f, g = x1, f1, g1
        its += act.long()
        if progress is not None:
            progress(int(act.sum()))
    write_back()
    return it
