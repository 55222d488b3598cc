"""Batched truncated Newton for the convex heads: the multinomial L2 problem of :mod:`.lbfgs` in tens of steps.

Same problem, same certificate as :mod:`.lbfgs` (the largest entry of a head's float64 gradient is at most
``tol``), another path to it. Each Newton step solves ``H d = -g`` approximately by preconditioned conjugate
gradients (Hessian-free, as liblinear's TRON and scikit-learn's ``newton-cg``), then takes the step with a
backtracking (Armijo) line search on the float64 objective. A Hessian-vector product costs what a gradient
costs -- two batched matrix products -- and never builds the ``K(F+1)``-square Hessian
``Σ_n (diag p_n - p_n p_nᵀ) ⊗ x_n x_nᵀ / N + λ``:

    u_n = V x_n,   (Hv)_k = Σ_n p_nk (u_nk - p_nᵀu_n) x_n / N + λ v_k.

The products inside the conjugate gradients run in float32 (a search direction needs no more); the objective,
the gradient and so the certificate are float64.

The preconditioner is the Hessian's diagonal class blocks ``[X 1]ᵀ diag(p_k(1 - p_k)) [X 1] / N + λ I`` at the
strength's warm start, factored (Cholesky) once per strength and projected onto ``Σ_k v_k = 0``
(:class:`ClassBlocks`).

On the CPU (one head a call, on :func:`~iis_study.core.device.worker_pool`'s single-threaded workers) the blocks
and the conjugate gradients run in compiled kernels (:mod:`.kernels`: BLAS ``ssyrk`` and a float32 Cholesky for
the blocks, the whole CG loop in one call, a sparse design where every row keeps few concepts); on a GPU, the
heads of a level run as one batch of torch operations (:func:`batched_conjugate_gradients`). The line search,
the objective and the certificate are the same torch float64 code on both.

Only the solve of one L2 strength lives here: :func:`newton` is the inner solver of
:func:`~iis_study.core.solvers.lbfgs.solve_logistic`, which walks the strengths with warm starts.
"""

from __future__ import annotations

import torch

from . import kernels

ARMIJO = 1e-4
MAX_LINE_SEARCH = 40
BLOCK_BYTES = 256 * 2**20  # the preconditioner's blocks are built this many bytes of weighted rows at a time
MAX_CG = 200  # per Newton step; a step with fewer converged CG iterations is still a descent direction
# the class blocks cost K·N·(F+1)² to build and K·(F+1)² floats to keep: Newton up to this many columns (the
# concept heads, M + 1 = 201); a wider design (a probe on 1,280 features) is L-BFGS's
MAX_FEATURES = 512
FORCING = 0.1  # CG stops at relative residual min(FORCING, sqrt(|g|)): superlinear near the optimum ...
TARGET = 0.3  # ... or once the gradient it predicts is within TARGET x the tolerance


class DenseDesign:
    """The materialised design of some groups in float64 (the objective) and, with its column of ones,
    ``[X 1]`` in float32 (the products and the preconditioner)."""

    def __init__(self, x64: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        self.x64 = x64  # (G, N, F)
        self.n = x64.shape[1]
        self.xa32 = torch.cat([x64, torch.ones_like(x64[..., :1])], dim=-1).float()  # (G, N, F+1)
        self.y = y.long()
        self.onehot64 = torch.nn.functional.one_hot(self.y, num_classes).T.to(torch.float64)  # (K, N)
        self._rows: dict[int, kernels.RowDesign] = {}

    def rows(self, group: int) -> kernels.RowDesign:
        """Design group ``group`` as the CPU's compiled kernels read it (dense with its transpose, or sparse), made
        on first use and kept: every L2 strength of every head on the group reads it (a sparse one takes ~1 ms to
        make; a dense one keeps a transposed copy, N (F+1) floats). Pool workers may make the same group twice at
        once; either copy serves."""
        row = self._rows.get(group)
        if row is None:
            row = self._rows[group] = kernels.RowDesign(self.xa32[group].numpy())
        return row


def _logits(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``W xᵀ + b`` laid out (H, K, N), so reductions over classes run across contiguous rows."""
    f = x.shape[-1]
    return torch.baddbmm(theta[..., f:], theta[..., :f], x.transpose(1, 2))


def loss_grad(
    design: DenseDesign, groups: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (H,), gradient (H, K, F+1) and the softmax (H, K, N) of the heads ``theta`` (H, K, F+1), float64,
    head ``h`` reading design group ``groups[h]`` with L2 strength ``lam[h]`` (per sample)."""
    x = design.x64[groups]
    f = x.shape[-1]
    z = _logits(x, theta)
    zmax = z.amax(dim=1, keepdim=True)
    e = (z - zmax).exp_()
    s = e.sum(dim=1, keepdim=True)
    lse = s.log() + zmax  # (H, 1, N)
    y = design.onehot64
    loss = (lse.squeeze(1) - (z * y).sum(dim=1)).mean(dim=1)
    p = e.div_(s)
    r = p - y
    w = theta[..., :f]
    loss = loss + 0.5 * lam * (w * w).sum(dim=(1, 2))
    grad = torch.empty_like(theta)
    grad[..., :f] = torch.bmm(r, x) / design.n + lam.view(-1, 1, 1) * w
    grad[..., f] = r.mean(dim=2)
    return loss, grad, p


def hess_vec(xa: torch.Tensor, p: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, n: int) -> torch.Tensor:
    """``H v`` per head, float32: ``xa`` (H, N, F+1) the design with its column of ones, ``p`` (H, K, N) the
    softmax, ``v`` (H, K, F+1) (the bias last, not penalised)."""
    u = torch.bmm(v, xa.transpose(1, 2))  # (H, K, N)
    pu = p * u
    jv = pu.sub_(p * pu.sum(dim=1, keepdim=True))
    out = torch.bmm(jv, xa).div_(n)
    out[..., :-1] += lam.view(-1, 1, 1) * v[..., :-1]
    return out


def batched_blocks(xa: torch.Tensor, groups: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """The class blocks ``[X 1]ᵀ diag(c_k) [X 1]`` (H, K, F+1, F+1), float32, of heads reading design groups
    ``groups`` of ``xa`` (G, N, F+1) with curvatures ``curv`` (H, K, N), by batched products (a GPU's build; the
    CPU's is :func:`~iis_study.core.solvers.kernels.class_factors`)."""
    h, k, n = curv.shape
    f1 = xa.shape[-1]
    blocks = torch.empty(h, k, f1, f1, dtype=torch.float32, device=xa.device)
    chunk = max(1, BLOCK_BYTES // (k * n * f1 * 4))
    for i in range(0, h, chunk):
        x = xa[groups[i : i + chunk]]  # (h', N, F+1)
        w = curv[i : i + chunk].unsqueeze(2) * x.transpose(1, 2).contiguous().unsqueeze(1)  # (h', K, F+1, N)
        # one product per head, every class's rows stacked: (h', K(F+1), N) @ (h', N, F+1)
        blocks[i : i + chunk] = torch.bmm(w.reshape(-1, k * f1, n), x).view(-1, k, f1, f1)
    return blocks


def factor64(blocks: torch.Tensor, n: int, lam: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factors (float32) of ``blocks / n + λ I`` (H, K, F+1, F+1), factored in float64; a block
    that rounding leaves not positive definite gets the smallest of :data:`kernels.JITTER`'s shares of its mean
    diagonal that factors (as :func:`~iis_study.core.solvers.kernels.class_factors`)."""
    f1 = blocks.shape[-1]
    blocks = blocks.double() / n  # a copy: the caller's blocks stay as they were
    blocks.diagonal(dim1=-2, dim2=-1).add_(lam.view(-1, 1, 1) + 1e-12)
    # LAPACK rounds differently on 1 and 2 threads, and the preconditioner steers the iterates: one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chol, info = torch.linalg.cholesky_ex(blocks)
        eye = torch.eye(f1, dtype=blocks.dtype, device=blocks.device)
        base = blocks.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        for share in kernels.JITTER:
            bad = info != 0
            if not bool(bad.any()):
                break
            chol[bad], info[bad] = torch.linalg.cholesky_ex(blocks[bad] + share * base[bad].view(-1, 1, 1) * eye)
        if bool((info != 0).any()):
            raise FloatingPointError("class blocks are not positive definite even with their mean diagonal added: "
                                     "a NaN or inf in the design or the softmax?")
        return chol.float()
    finally:
        torch.set_num_threads(threads)


class ClassBlocks:
    """The preconditioner: the Hessian's diagonal class blocks ``[X 1]ᵀ diag(p_k(1 - p_k)) [X 1] / N + λ I`` at
    one iterate, factored (Cholesky, kept in float32), applied block by block by two triangular solves and
    projected onto ``Σ_k v_k = 0``.

    The projection matters: the data term has no curvature along a shift of every class's weights by the same
    vector (the softmax does not see it), only the penalty's ``λ``. Block-Jacobi scales the classes differently,
    so without it the conjugate gradients leak into that nearly flat subspace and stall (measured: 5-8x more
    products at C >= 10). Gradient and Hessian-vector products of a point with ``Σ_k w_k = 0`` (every iterate
    from a zero or warm start: the optimum lies there) stay in it, so the projected preconditioner is exact
    on the subspace that matters. The blocks are built once per L2 strength at its warm start ("lagged"); a
    block costs ``N (F+1)²`` per class, about (F+1)/2 Hessian-vector products, so building them every Newton
    step costs more than it saves.

    On the CPU the blocks are built and factored in float32 by :func:`~iis_study.core.solvers.kernels.class_factors`
    (a block rounding leaves not positive definite gets a small relative ridge) and kept in C order for the
    compiled substitutions; elsewhere built by ``bmm`` and factored in float64 (:func:`factor64`). Either way
    ``chol`` holds float32 lower factors (H, K, F+1, F+1)."""

    def __init__(self, design: "DenseDesign", groups: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> None:
        xa = design.xa32
        h, k, n = p.shape
        f1 = xa.shape[-1]
        curv = (p * (1.0 - p)).float()  # (H, K, N)
        if xa.device.type == "cpu":  # built (one triangle, ssyrk) and factored in float32, compiled, off the GIL
            self.chol = torch.empty(h, k, f1, f1, dtype=torch.float32)
            for i in range(h):
                kernels.class_factors(design.rows(int(groups[i])), curv[i].numpy(), self.chol[i].numpy(), 1.0 / n,
                                      float(lam[i]) + 1e-12)
            return
        self.chol = factor64(batched_blocks(xa, groups, curv), n, lam)

    def select(self, idx: torch.Tensor) -> "ClassBlocks":
        out = object.__new__(ClassBlocks)
        out.chol = self.chol[idx]
        return out

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        # two triangular solves on each class's float32 Cholesky factor instead of an inverse: no inversion
        # (cholesky_inverse, 3.4 ms a build at the study's shape) and each application cheaper than the block x
        # column product applied before (measured in issue 31's fifth session); the CPU's compiled CG substitutes
        # in its own loop (kernels.py) and calls this only for a step that is not a descent direction
        h, k, f1 = r.shape
        z = torch.cholesky_solve(r.reshape(h * k, f1, 1), self.chol.view(h * k, f1, f1)).view(h, k, f1)
        return z.sub_(z.mean(dim=1, keepdim=True))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(1, 2))


def _cg(
    design: DenseDesign, groups: torch.Tensor, p: torch.Tensor, pre: ClassBlocks, lam: torch.Tensor, g: torch.Tensor,
    eta: torch.Tensor, target: float, max_cg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conjugate gradients of one Newton step: on the CPU each head in the compiled
    :func:`~iis_study.core.solvers.kernels.conjugate_gradients`, elsewhere :func:`batched_conjugate_gradients`.
    Returns ``d`` (float64) and each head's products."""
    if g.device.type != "cpu":
        return batched_conjugate_gradients(design, groups, p, pre, lam, g, eta, target, max_cg)
    b = -g.float()
    goal = eta.float() * b.flatten(1).norm(dim=1)
    d = torch.empty_like(b)
    products = torch.zeros(b.shape[0], dtype=torch.long)
    for i in range(b.shape[0]):
        d_i, products[i] = kernels.conjugate_gradients(
            design.rows(int(groups[i])), p[i].numpy(), pre.chol[i].numpy(), float(lam[i]), b[i].numpy(),
            float(goal[i]), target, max_cg)
        d[i] = torch.from_numpy(d_i)
    return d.double(), products


def batched_conjugate_gradients(
    design: DenseDesign, groups: torch.Tensor, p: torch.Tensor, pre: ClassBlocks, lam: torch.Tensor, g: torch.Tensor,
    eta: torch.Tensor, target: float, max_cg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preconditioned conjugate gradients on ``H d = -g`` per head, float32, every head of the batch at once (the
    GPU's form), until ``|r| <= eta |g|`` or the residual's largest entry is within ``target`` (or a head's
    curvature along its direction is not positive). Returns ``d`` (float64) and each head's products."""
    b = -g.float()
    xa = design.xa32[groups]
    lam32 = lam.float()
    d = torch.zeros_like(b)
    r = b.clone()
    z = pre(r)
    s = z.clone()
    rz = _dot(r, z)
    goal = eta.float() * b.flatten(1).norm(dim=1)
    live = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    products = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(max_cg):
        hs = hess_vec(xa, p, s, lam32, design.n)
        products += live.long()
        shs = _dot(s, hs)
        ok = live & (shs > 0)
        alpha = torch.where(ok, rz / torch.where(ok, shs, 1.0), 0.0)
        d += alpha.view(-1, 1, 1) * s
        r -= alpha.view(-1, 1, 1) * hs
        # the residual is the gradient the quadratic model predicts after the step: stop once it is
        # within a fraction of the tolerance, or relatively small (the forcing term)
        live = ok & (r.flatten(1).norm(dim=1) > goal) & (r.abs().flatten(1).amax(dim=1) > target)
        if not bool(live.any()):
            break
        z = pre(r)
        rz_new = _dot(r, z)
        beta = torch.where(live, rz_new / torch.where(live, rz, 1.0), 0.0)
        s = z + beta.view(-1, 1, 1) * s
        rz = rz_new
    return d.double(), products


def newton(
    design: DenseDesign,
    theta: torch.Tensor,
    groups: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
    iters: torch.Tensor,
    stalled: torch.Tensor,
    products: torch.Tensor,
    max_cg: int = MAX_CG,
) -> None:
    """Truncated Newton on ``theta`` (H, K, F+1) in place, head ``h`` of design group ``groups[h]``, all at the
    per-sample L2 strength ``lam``, until each head's largest gradient entry is within ``tol``, its line search
    finds no decrease (``stalled``) or ``max_iter`` steps (``iters``); ``products`` counts each head's
    Hessian-vector products. Heads that finish leave the batch."""
    threads = torch.get_num_threads()
    try:
        _newton(design, theta, groups, lam, tol, max_iter, iters, stalled, products, max_cg, threads)
    finally:
        torch.set_num_threads(threads)


def _retire(
    theta: torch.Tensor, live: torch.Tensor, out: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Write the heads ``out`` (a mask over the live heads) back into ``theta`` and drop them from the batch:
    ``state[0]`` is the iterate, every entry of ``state`` is indexed by live head."""
    theta[live[out]] = state[0][out]
    keep = (~out).nonzero().flatten()
    return live[keep], tuple(t[keep] for t in state)


def _newton(design, theta, groups, lam, tol, max_iter, iters, stalled, products, max_cg, threads) -> None:
    h_all = theta.shape[0]
    live = torch.arange(h_all, device=theta.device)
    lam_t = torch.full((h_all,), lam, dtype=torch.float64, device=theta.device)
    x = theta.clone()
    torch.set_num_threads(1 if h_all < 2 else threads)
    f, g, p = loss_grad(design, groups, x, lam_t)
    pre_all = pre = pre_for = None
    for _ in range(max_iter):
        gmax = g.abs().flatten(1).amax(dim=1)
        act = gmax > tol
        if not bool(act.all()):
            live, (x, f, g, p, lam_t) = _retire(theta, live, ~act, (x, f, g, p, lam_t))
            if live.numel() == 0:
                return
        # a batched product of one head is split across threads inside its matrix product, which rounds
        # differently on 1 and 2 threads (measured); a batch of two or more is split by head: the same bits
        torch.set_num_threads(1 if live.numel() < 2 else threads)
        grp = groups[live]
        if pre_all is None:  # once per strength, at its warm start (ClassBlocks)
            pre_all, pre_live = ClassBlocks(design, grp, p, lam_t), live.clone()
        if pre is None or pre_for.numel() != live.numel():  # heads left the batch: their blocks too
            pre, pre_for = pre_all.select(torch.searchsorted(pre_live, live)), live
        gnorm = g.flatten(1).norm(dim=1)
        eta = torch.clamp(gnorm.sqrt(), max=FORCING)
        d, n_prod = _cg(design, grp, p.float(), pre, lam_t, g, eta, TARGET * tol, max_cg)
        products[live] += n_prod
        gd = _dot(g, d)
        bad = ~(gd < 0)  # not a descent direction (rounding): the preconditioned gradient instead
        if bool(bad.any()):
            pg = pre(g.float()).double()
            d = torch.where(bad.view(-1, 1, 1), -pg, d)
            gd = torch.where(bad, -_dot(g, pg), gd)
        t = torch.ones_like(f)
        done = torch.zeros(live.numel(), dtype=torch.bool, device=x.device)
        x1, f1, g1, p1 = x.clone(), f.clone(), g.clone(), p.clone()
        for _ in range(MAX_LINE_SEARCH):
            todo = (~done).nonzero().flatten()
            trial = x[todo] + t[todo].view(-1, 1, 1) * d[todo]
            torch.set_num_threads(1 if todo.numel() < 2 else threads)
            ft, gt, pt = loss_grad(design, grp[todo], trial, lam_t[todo])
            ok = torch.isfinite(ft) & (ft <= f[todo] + ARMIJO * t[todo] * gd[todo])
            acc = todo[ok]
            x1[acc], f1[acc], g1[acc], p1[acc] = trial[ok], ft[ok], gt[ok], pt[ok]
            done[acc] = True
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        failed = ~done
        if bool(failed.any()):  # no decrease at this precision: the head cannot move further
            stalled[live[failed]] = True
        iters[live] += 1
        x, f, g, p = x1, f1, g1, p1
        if bool(failed.any()):
            live, (x, f, g, p, lam_t) = _retire(theta, live, failed, (x, f, g, p, lam_t))
            if live.numel() == 0:
                return
    theta[live] = x


def dense_design(design, groups: torch.Tensor, num_classes: int) -> DenseDesign | None:
    """The :class:`DenseDesign` of a :class:`~iis_study.core.solvers.lbfgs.Design` whose float64 matrix is
    materialised (``design.materialised``); ``None`` for a streamed one (it would be built whole here)."""
    if not getattr(design, "materialised", False):
        return None
    x, y = next(iter(design.blocks(groups, torch.float64)))
    return DenseDesign(x, y, num_classes)

