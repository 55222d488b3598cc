"""Weight sparsity beside activation sparsity: NEC, ANEC-5 and ANEC-avg on the IIS's own concept activations.

The IIS measures *activation* sparsity: how much accuracy a linear head keeps when each image may use only a few
of its M concept activations. Concept-bottleneck papers (Label-free CBM, LaBo, VLG-CBM) measure *weight*
sparsity instead: the final layer ``W`` (K x M) is fitted along an L1 (elastic-net) path, and models are compared
at a matched **number of effective concepts**, NEC = the mean number of non-zero weights per class,
``nnz(W) / K``. ANEC-k is the test accuracy at NEC = k, ANEC-avg its mean over NEC levels (VLG-CBM: 5, 10, ...,
30). Here both are computed from the same inputs as the IIS heads: the concept activations ``LN(z·Cᵀ)`` of the
study's concept sets, their concept draws and their nulls (:mod:`~iis_study.core.concepts.nulls`).

The path. Columns are standardised on train; the objective per set at strength ``λ`` is the mean multinomial
cross-entropy plus ``λ·(α‖W‖₁ + (1-α)/2·‖W‖²)`` (bias not penalised), a convex problem. ``λ`` runs down a
geometric grid from ``λ_max`` (the smallest strength at which ``W = 0`` is optimal: every model there has NEC 0)
towards ``min_ratio · λ_max`` (a set leaves the path at its first point past the largest NEC level: the denser
end is never read), each solve warm-started from the last, each concept set's path one call on a pool of threads
(:func:`elastic_net_paths`; :func:`paths_of` also takes several sets, solved one after the other). Each point is solved on a working set of concepts (those already non-zero and those the sequential
strong rule keeps, grown by every concept whose optimality condition fails outside it, as glmnet does) by proximal
Newton (:func:`_newton`, the default ``solver: newton``: a handful of steps a point, each minimising the exact
second-order model by coordinate descent and, where that crawls on collinear concepts, by exact solves on the
step's support); a set whose Newton solve stalls, and every set with ``solver: fista``
(the first-order baseline), is finished by FISTA with adaptive restart and the step ``1/L`` from the largest
eigenvalue of the working set's Gram matrix. The logits are laid out (sets, classes, images) so that the softmax
runs over a contiguous axis. Each solve stops
when its optimality residual over every concept (the largest entry of the minimum-norm subgradient, the bias
gradient included) is within ``tolerance``; ``kkt`` records it, so a path point is certified as the convex heads
are. Accuracy at NEC level k: among the path's models with NEC <= k, the one with the best val accuracy
(ties: the sparser), reported on test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..device import worker_pool
from ..solvers.path_newton import proximal_newton
from .blocks import WeightSparsityParams
from ..heads import ConceptSpace, Split
from ..heads.activations import precompute_base
from ..concepts.nulls import null_set_name, set_name

logger = logging.getLogger(__name__)

# iterations: Newton steps (and FISTA iterations where FISTA finished a point) summed over the working-set rounds
PATH_COLUMNS = ["set", "step", "lam", "nec", "val_acc", "test_acc", "kkt", "iterations"]


def _design(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The IIS heads' inputs for one concept set, ``LN(z·Cᵀ)`` (N, M), float32; sharded features
    (:class:`~iis_study.core.representations.store.ShardedArray`) are read block by block (only the N x M activations are kept)."""
    space = ConceptSpace(kind="vectors", vectors=vectors.float())
    if hasattr(x, "iter_blocks"):
        return torch.cat([precompute_base(torch.as_tensor(r).float(), space) for _, r in x.iter_blocks()])
    return precompute_base(x.float(), space)


def _kkt(grad_w: torch.Tensor, grad_b: torch.Tensor, w: torch.Tensor, lam_l1: torch.Tensor) -> torch.Tensor:
    """Per set, the largest entry of the minimum-norm subgradient of the objective (``grad_w`` is the gradient of
    the smooth part: cross-entropy and the L2 share); 0 exactly at the optimum."""
    l1 = lam_l1.view(-1, 1, 1)
    nonzero = (grad_w + l1 * torch.sign(w)).abs()
    zero = (grad_w.abs() - l1).clamp_min(0.0)
    residual = torch.where(w != 0, nonzero, zero).amax(dim=(1, 2))
    return torch.maximum(residual, grad_b.abs().amax(dim=1))


def _fista(
    a: torch.Tensor, y_onehot: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, alpha: float,
    lipschitz: torch.Tensor, tolerance: float, max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every set's elastic-net logistic regression at its strength ``lam`` (S,) from ``(w, b)``.

    ``a`` (S, N, M) standardised activations, ``y_onehot`` (N, K). Returns ``w``, ``b``, the final residual
    (S,) and the iterations (S,). A set leaves the batch once its residual is within ``tolerance`` (the others
    go on without it); no set's step, momentum or restart depends on another's."""
    s_all = a.shape[0]
    a_t, y_t = a.transpose(1, 2).contiguous(), y_onehot.T.contiguous()
    w_out, b_out = w.clone(), b.clone()
    res_out = torch.full((s_all,), math.inf, dtype=a.dtype)
    it_out = torch.zeros(s_all, dtype=torch.long)
    live = torch.arange(s_all)
    l2 = (1.0 - alpha) * lam
    step = 1.0 / (lipschitz + l2)  # (S,)
    thresh = step * alpha * lam
    zw, zb, t = w.clone(), b.clone(), torch.ones_like(lam)

    for it in range(1, max_iter + 1):
        gw, gb = _grads_t(a, a_t, y_t, zw, zb, l2)
        w_new = zw - step.view(-1, 1, 1) * gw
        w_new = torch.sign(w_new) * (w_new.abs() - thresh.view(-1, 1, 1)).clamp_min(0.0)
        b_new = zb - step.view(-1, 1) * gb
        # adaptive restart (O'Donoghue & Candes): momentum off when the step points back
        back = ((zw - w_new) * (w_new - w)).sum(dim=(1, 2)) + ((zb - b_new) * (b_new - b)).sum(dim=1) > 0
        t_new = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0  # per set: the sets never share a step
        beta = torch.where(back, torch.zeros_like(t), (t - 1.0) / t_new)
        zw = w_new + beta.view(-1, 1, 1) * (w_new - w)
        zb = b_new + beta.view(-1, 1) * (b_new - b)
        t = torch.where(back, torch.ones_like(t), t_new)
        w, b = w_new, b_new
        if it % 10 == 0 or it == max_iter:
            gw, gb = _grads_t(a, a_t, y_t, w, b, l2)
            residual = _kkt(gw, gb, w, alpha * lam)
            done = (residual <= tolerance) | (it == max_iter)
            if bool(done.any()):
                fin = live[done]
                w_out[fin], b_out[fin], res_out[fin], it_out[fin] = w[done], b[done], residual[done], it
                keep = ~done
                if not bool(keep.any()):
                    break
                live, a, a_t, w, b = live[keep], a[keep], a_t[keep], w[keep], b[keep]
                zw, zb, t = zw[keep], zb[keep], t[keep]
                lam, l2, step, thresh = lam[keep], l2[keep], step[keep], thresh[keep]
    return w_out, b_out, res_out, it_out


def _lipschitz(a: torch.Tensor) -> torch.Tensor:
    """Per set, ``½ λ_max([a, 1]ᵀ[a, 1] / N)``: the smooth part's gradient is Lipschitz with this constant
    (Böhning's bound on the softmax cross-entropy's Hessian)."""
    s, n, _ = a.shape
    design = torch.cat([a, torch.ones(s, n, 1, dtype=a.dtype)], dim=2).double()
    return 0.5 * torch.linalg.eigvalsh(design.transpose(1, 2) @ design / n)[:, -1].to(a.dtype)


def _grads_t(
    a: torch.Tensor, a_t: torch.Tensor, y_t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of the smooth part (mean cross-entropy and the L2 share) in ``W`` (S, K, M) and in the bias
    (S, K). The logits are laid out (S, K, N), ``a_t`` = ``aᵀ`` and ``y_t`` = one-hot ``(K, N)``: a softmax
    over the short class axis of an (S, N, K) array cost ~5x the whole gradient on a CPU (measured)."""
    z = torch.baddbmm(b.unsqueeze(2), w, a_t)
    e = (z - z.amax(dim=1, keepdim=True)).exp_()
    p = e.div_(e.sum(dim=1, keepdim=True)).sub_(y_t)
    return torch.bmm(p, a).div_(a.shape[1]) + l2.view(-1, 1, 1) * w, p.mean(dim=2)


NEWTON_STEPS = 50  # proximal Newton steps per solve before FISTA takes over (a handful are used: docs/performance.md)
NEWTON_MARGIN = 0.25  # Newton stops at this share of the tolerance: the float32 certificate on every concept follows
QP_FORCING = 0.01  # each step's model is minimised until no coordinate moves its gradient by more than this x residual
QP_SWEEPS = 500  # coordinate-descent sweeps per step at most
QP_REFINE_AFTER = 150  # sweeps before the model is solved on its support (see path_newton.lasso_qp)
QP_SOLVES = 50  # such solves per step at most


def _newton(
    a: torch.Tensor, y_onehot: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, alpha: float,
    tolerance: float, max_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every set's elastic-net logistic regression at ``lam`` (S,) by proximal Newton, from ``(w, b)``.

    Each step (newGLMNET: Yuan, Ho & Lin 2012, liblinear's L1 logistic solver; glmnet's outer loop) builds the
    smooth part's exact second-order model on the *free* weights — those non-zero and those at zero whose
    optimality condition fails by more than the tolerance — and the biases: the Hessian
    ``Σᵢ (diag pᵢ - pᵢpᵢᵀ) ⊗ xᵢxᵢᵀ / N + (1-α)λ`` (at most ``K·NEC + K`` square, small; its sums in float32
    by :func:`~iis_study.core.solvers.path_newton.free_hessian`, the gradient, the objective and the residual
    float64), minimises model + ``αλ‖W‖₁`` over the step by coordinate descent, with exact solves on the support
    once ``QP_REFINE_AFTER`` sweeps have not converged (:func:`~iis_study.core.solvers.path_newton.lasso_qp`, to a
    forcing of 0.01 x the current residual), and cuts the step back
    until the whole objective falls by a share of the model's decrease (Tseng & Yun's Armijo rule). Weights that
    the L1 term sets to zero leave the model exactly; near the solution the free set is the support and the
    steps converge quadratically. ``a`` (S, N, M), ``y_onehot`` (N, K). Returns ``w``, ``b`` (in ``a``'s
    dtype), the float64 optimality residual (S,) and the steps (S,); a set still above ``tolerance`` after
    ``max_steps`` (or whose line search found no decrease) is returned where it stopped."""
    max_steps = NEWTON_STEPS if max_steps is None else max_steps
    dtype = a.dtype
    a, labels = a.double(), y_onehot.argmax(dim=1).numpy()
    w, b = w.double().clone(), b.double().clone()
    res_out = torch.empty(a.shape[0], dtype=torch.float64)
    steps = torch.zeros(a.shape[0], dtype=torch.long)
    for i, lam_i in enumerate(lam.tolist()):  # one set at a time (one compiled call: path_newton.proximal_newton)
        res_out[i], steps[i] = proximal_newton(
            a[i].numpy(), labels, w[i].numpy(), b[i].numpy(), alpha * lam_i, (1.0 - alpha) * lam_i, tolerance,
            max_steps, QP_FORCING, QP_SWEEPS, QP_REFINE_AFTER, QP_SOLVES)
    return w.to(dtype), b.to(dtype), res_out, steps


def _solve_at(
    a: torch.Tensor, y_onehot: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: torch.Tensor,
    candidates: torch.Tensor, alpha: float, tolerance: float, max_iter: int, solver: str = "newton",
    a_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One path point for every set, solved on a working set of concepts and certified on all of them.

    The working set of a set (a concept = one column of ``W``, all classes) starts as ``candidates`` (S, M) and
    grows by every concept whose optimality condition fails outside it, until none does (glmnet's active-set
    scheme). On the working set the design has fewer columns, so each iteration is cheaper and the step ``1/L``
    is larger (``L`` from the working set's columns only). The residual returned is the full problem's.
    Returns ``w``, ``b``, the residual, the iterations and the full smooth gradient in ``W`` (for the next
    point's strong rule). ``a_t``: ``a`` transposed (S, M, N), contiguous, where the caller has it."""
    s, _, m = a.shape
    a_t = a.transpose(1, 2).contiguous() if a_t is None else a_t
    y_t = y_onehot.T.contiguous()
    k = w.shape[1]
    l2 = (1.0 - alpha) * lam
    active = candidates | (w != 0).any(dim=1)
    todo = torch.ones(s, dtype=torch.bool)
    iters = torch.zeros(s, dtype=torch.long)
    gw_all, gb_all = torch.empty_like(w), torch.empty_like(b)  # each set's smooth gradient at its last round's w
    while True:
        rows = todo.nonzero().flatten()
        every = len(rows) == s
        a_r, a_t_r = (a, a_t) if every else (a[rows], a_t[rows])
        act = active[rows]
        width = max(1, int(act.sum(dim=1).max()))
        # each set's working columns first (stable: in concept order), padded with zero columns
        order = torch.sort((~act).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.gather(act, 1, order)  # (R, P)
        a_w = torch.gather(a_r, 2, order.unsqueeze(1).expand(-1, a.shape[1], -1)) * valid.unsqueeze(1)
        w_w = torch.gather(w[rows], 2, order.unsqueeze(1).expand(-1, k, -1)) * valid.unsqueeze(1)
        if solver == "newton":
            w_w, b_new, res, it = _newton(a_w, y_onehot, w_w, b[rows], lam[rows], alpha, NEWTON_MARGIN * tolerance)
            stuck = (~(res <= NEWTON_MARGIN * tolerance)).nonzero().flatten()  # a NaN residual too
        else:
            b_new, it, stuck = b[rows].clone(), torch.zeros(len(rows), dtype=torch.long), torch.arange(len(rows))
        if len(stuck):  # FISTA, or Newton stalled (rare): FISTA from where it stopped
            a_s = a_w[stuck]
            w_w[stuck], b_new[stuck], _, more = _fista(
                a_s, y_onehot, w_w[stuck], b_new[stuck], lam[rows][stuck], alpha, _lipschitz(a_s), tolerance,
                max(1, max_iter - int(iters[rows].min())))
            it[stuck] += more
        full = torch.zeros(len(rows), k, m, dtype=w.dtype).scatter_add_(
            2, order.unsqueeze(1).expand(-1, k, -1), w_w * valid.unsqueeze(1))
        w[rows], b[rows], iters[rows] = full, b_new, iters[rows] + it
        gw_all[rows], gb_all[rows] = gw, gb = _grads_t(a_r, a_t_r, y_t, full, b_new, l2[rows])
        violated = ((gw.abs() - alpha * lam[rows].view(-1, 1, 1)) > tolerance).any(dim=1) & ~act
        active[rows] |= violated
        todo[rows] = violated.any(dim=1) & (iters[rows] < max_iter)
        if not bool(todo.any()):
            break
    return w, b, _kkt(gw_all, gb_all, w, alpha * lam), iters, gw_all


def elastic_net_paths(
    train: Split, val: Split, test: Split, concept_sets: Mapping[str, torch.Tensor], num_classes: int,
    params: WeightSparsityParams | Mapping[str, Any] | None = None, workers: int | None = None,
) -> pd.DataFrame:
    """The elastic-net path of the final layer for every concept set (name -> (M, D) unit rows). One row per
    (set, path step): ``lam`` (relative to the set's ``λ_max``), ``nec``, ``val_acc``, ``test_acc``, the
    optimality residual ``kkt`` and ``iterations``; rows in path-step order, the sets in the given order within
    a step (those of one size M together).

    On the CPU each set's path is one call, ``workers`` sets at a time on as many Python threads, each running
    torch on one thread (default: ``torch.get_num_threads()``): a set's design and Hessians stay in cache, and a
    set solved alone rounds the same whatever the other sets and the thread count, so the paths do not depend on
    ``workers`` (as :func:`~iis_study.core.solvers.lbfgs.solve_logistic`'s heads)."""
    params = WeightSparsityParams.from_params(params or {})
    names = list(concept_sets)
    by_m: dict[int, list[str]] = {}
    for name in names:
        by_m.setdefault(int(concept_sets[name].shape[0]), []).append(name)
    with worker_pool(workers) as pool:
        jobs = {n: pool.submit(paths_of, train, val, test, {n: concept_sets[n]}, num_classes, params) for n in names}
        per_set = {n: job.result() for n, job in jobs.items()}
    rows: list[dict[str, Any]] = []
    for group in by_m.values():
        rank = {n: i for i, n in enumerate(group)}
        rows += sorted((r for n in group for r in per_set[n]), key=lambda r: (r["step"], rank[r["set"]]))
    worst = max((r["kkt"] for r in rows), default=0.0)
    if worst > params.tolerance:
        logger.warning("weight-sparsity path: residual %.2e above the tolerance %.0e (raise weight_sparsity.max_iter)",
                       worst, params.tolerance)
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def paths_of(
    train: Split, val: Split, test: Split, sets: Mapping[str, torch.Tensor], k: int, params: WeightSparsityParams
) -> list[dict[str, Any]]:
    """The paths of ``sets`` (all of one size M) in one batched computation on the calling thread: the rows of
    :func:`elastic_net_paths` (which calls this once per set), step by step, the sets in order within a step."""
    names = list(sets)
    a_tr = torch.stack([_design(train.x, sets[n]) for n in names])
    mean, std = a_tr.mean(dim=1, keepdim=True), a_tr.std(dim=1, keepdim=True).clamp_min(1e-8)
    a_tr = (a_tr - mean) / std
    a_tr_t = a_tr.transpose(1, 2).contiguous()
    a_va = (torch.stack([_design(val.x, sets[n]) for n in names]) - mean) / std
    a_te = (torch.stack([_design(test.x, sets[n]) for n in names]) - mean) / std
    y = F.one_hot(train.y.long(), k).to(a_tr.dtype)
    s, n, m = a_tr.shape
    prior = y.mean(dim=0).clamp_min(1e-12)
    b = prior.log().expand(s, k).clone()
    w = torch.zeros(s, k, m, dtype=a_tr.dtype)
    grad = torch.bmm((torch.softmax(b, dim=-1).unsqueeze(1) - y).transpose(1, 2), a_tr) / n
    lam_max = grad.abs().amax(dim=(1, 2)) / params.alpha * (1 + 1e-6)  # W = 0 optimal, not at the edge
    ratios = np.geomspace(1.0, params.min_ratio, params.path_length)
    rows = []
    top = max(params.nec_levels)
    lam_prev = lam_max
    live = torch.ones(s, dtype=torch.bool)  # sets still at or below the largest NEC level
    kkt, iters = torch.zeros(s, dtype=a_tr.dtype), torch.zeros(s, dtype=torch.long)
    for step, ratio in enumerate(ratios):
        lam = lam_max * float(ratio)
        # the sequential strong rule (Tibshirani et al. 2012): a concept whose gradient at the last point is
        # below α(2λ - λ_prev) in every class is likely to stay at zero; it starts outside the working set and
        # enters only if its optimality condition fails (the certificate is on every concept)
        strong = (grad.abs() >= (params.alpha * (2 * lam - lam_prev)).view(-1, 1, 1)).any(dim=1)
        idx = live.nonzero().flatten()
        a_i, a_i_t = (a_tr, a_tr_t) if len(idx) == s else (a_tr[idx], a_tr_t[idx])
        w[idx], b[idx], kkt[idx], iters[idx], grad[idx] = _solve_at(
            a_i, y, w[idx], b[idx], lam[idx], strong[idx], params.alpha, params.tolerance, params.max_iter,
            params.solver, a_i_t)
        lam_prev = lam
        nec = (w != 0).sum(dim=(1, 2)).double() / k
        acc = {}
        for split, a, labels in (("val", a_va, val.y), ("test", a_te, test.y)):
            pred = torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2)).argmax(dim=-1)
            acc[split] = (pred == labels.long().view(1, -1)).double().mean(dim=1)
        for i in idx.tolist():
            rows.append({"set": names[i], "step": step, "lam": float(ratio), "nec": float(nec[i]),
                         "val_acc": float(acc["val"][i]), "test_acc": float(acc["test"][i]),
                         "kkt": float(kkt[i]), "iterations": int(iters[i])})
        live &= nec <= top  # past the largest NEC level: the rest of this set's path is never read
        if not bool(live.any()):
            break
    return rows


def accuracy_at_nec(path: pd.DataFrame, level: float) -> float:
    """ANEC-k of one set's path: among its models with NEC <= ``level``, the best on val (ties: the sparser,
    i.e. the earlier step), its test accuracy."""
    within = path[path["nec"] <= level + 1e-9].sort_values("step")
    if within.empty:
        return float("nan")
    return float(within.loc[within["val_acc"].idxmax(), "test_acc"])


def anec(path: pd.DataFrame, levels: Sequence[float]) -> tuple[float, float]:
    """``(ANEC at the first level, ANEC-avg over levels)`` of one set's path."""
    values = [accuracy_at_nec(path, lv) for lv in levels]
    return values[0], float(np.mean(values))


def weight_sparsity_scores(
    paths: pd.DataFrame, concept_type: str, draws: int, nulls: Sequence[str],
    params: WeightSparsityParams | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One concept type's ANEC numbers, each the mean over concept draws, beside each null's: ``anec_<first
    level>``, ``anec_avg``, their spread over draws ``anec_avg_sd_draw``, ``anec_<level>_null_<kind>``,
    ``anec_avg_null_<kind>``, ``anec_avg_excess_<kind>``, and ``anec_certified`` (every path point of these sets
    within the tolerance). Sets are named as :class:`~iis_study.core.concepts.nulls.ConceptDraws` names them, draw 0 of
    the type being ``draw/<type>/0``."""
    params = WeightSparsityParams.from_params(params or {})
    levels, first = params.nec_levels, f"anec_{params.nec_levels[0]:g}"

    def over(names: list[str]) -> tuple[list[float], list[float]]:
        got = [anec(paths[paths["set"] == n], levels) for n in names if (paths["set"] == n).any()]
        return [g[0] for g in got], [g[1] for g in got]

    real = [set_name("draw", concept_type, r) for r in range(draws)]
    if not paths["set"].isin(real).any():  # a type with no path (end-to-end, textual): no weight-sparsity numbers
        return {}
    k_first, k_avg = over(real)
    out: dict[str, Any] = {first: float(np.mean(k_first)) if k_first else float("nan"),
                           "anec_avg": float(np.mean(k_avg)) if k_avg else float("nan"),
                           "anec_avg_sd_draw": float(np.std(k_avg, ddof=1)) if len(k_avg) > 1 else float("nan")}
    used = list(real)
    for kind in nulls:
        names = [null_set_name(kind, concept_type, r) for r in range(draws)]
        used += names
        n_first, n_avg = over(names)
        out[f"{first}_null_{kind}"] = float(np.mean(n_first)) if n_first else float("nan")
        out[f"anec_avg_null_{kind}"] = float(np.mean(n_avg)) if n_avg else float("nan")
        out[f"anec_avg_excess_{kind}"] = out["anec_avg"] - out[f"anec_avg_null_{kind}"]
    mine = paths[paths["set"].isin(used)]
    out["anec_certified"] = bool((mine["kkt"] <= params.tolerance).all()) if len(mine) else False
    return out
