"""Weight sparsity beside activation sparsity: NEC, ANEC-5 and ANEC-avg on the IIS's own concept activations.

The IIS measures *activation* sparsity: how much accuracy a linear head keeps when each image may use only a few
of its M concept activations. Concept-bottleneck papers (Label-free CBM, LaBo, VLG-CBM) measure *weight*
sparsity instead: the final layer ``W`` (K x M) is fitted along an L1 (elastic-net) path, and models are compared
at a matched **number of effective concepts**, NEC = the mean number of non-zero weights per class,
``nnz(W) / K``. ANEC-k is the test accuracy at NEC = k, ANEC-avg its mean over NEC levels (VLG-CBM: 5, 10, ...,
30). Here both are computed from the same inputs as the IIS heads: the concept activations ``LN(z·Cᵀ)`` of the
study's concept sets, their concept draws and their nulls (:mod:`~iis_study.core.nulls`).

The path. Columns are standardised on train; the objective per set at strength ``λ`` is the mean multinomial
cross-entropy plus ``λ·(α‖W‖₁ + (1-α)/2·‖W‖²)`` (bias not penalised), a convex problem. ``λ`` runs down a
geometric grid from ``λ_max`` (the smallest strength at which ``W = 0`` is optimal: every model there has NEC 0)
towards ``min_ratio · λ_max`` (stopping once every set's NEC is past the largest NEC level: the denser end is never
read), each solve warm-started from the last, every concept set of a representation in one
batched computation (FISTA with adaptive restart, step ``1/L`` from the largest eigenvalue of the design's Gram
matrix). Each solve stops when its optimality residual (the largest entry of the minimum-norm subgradient, the
bias gradient included) is within ``tolerance``; ``kkt`` records it, so a path point is certified as the convex
heads are. Accuracy at NEC level k: among the path's models with NEC <= k, the one with the best val accuracy
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

from .config import WeightSparsityParams
from .heads import ConceptSpace, Split
from .heads.activations import _precompute_base
from .nulls import null_set_name, set_name

logger = logging.getLogger(__name__)

PATH_COLUMNS = ["set", "step", "lam", "nec", "val_acc", "test_acc", "kkt", "iterations"]


def _design(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The IIS heads' inputs for one concept set, ``LN(z·Cᵀ)`` (N, M), float32; sharded features
    (:class:`~iis_study.core.store.ShardedArray`) are read block by block (only the N x M activations are kept)."""
    space = ConceptSpace(kind="vectors", vectors=vectors.float())
    if hasattr(x, "iter_blocks"):
        return torch.cat([_precompute_base(torch.as_tensor(r).float(), space) for _, r in x.iter_blocks()])
    return _precompute_base(x.float(), space)


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
    (S,) and the iterations (S,)."""
    n = a.shape[1]
    l2 = (1.0 - alpha) * lam
    step = 1.0 / (lipschitz + l2)  # (S,)
    thresh = (step * alpha * lam).view(-1, 1, 1)
    done = torch.zeros(a.shape[0], dtype=torch.bool)
    iters = torch.zeros(a.shape[0], dtype=torch.long)
    residual = torch.full((a.shape[0],), math.inf, dtype=a.dtype)
    zw, zb, t = w.clone(), b.clone(), torch.ones_like(lam)

    def grads(wv: torch.Tensor, bv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(torch.baddbmm(bv.unsqueeze(1), a, wv.transpose(1, 2)), dim=-1) - y_onehot
        return torch.bmm(p.transpose(1, 2), a) / n + l2.view(-1, 1, 1) * wv, p.mean(dim=1)

    for it in range(1, max_iter + 1):
        gw, gb = grads(zw, zb)
        w_new = zw - step.view(-1, 1, 1) * gw
        w_new = torch.sign(w_new) * (w_new.abs() - thresh).clamp_min(0.0)
        b_new = zb - step.view(-1, 1) * gb
        w_new = torch.where(done.view(-1, 1, 1), w, w_new)
        b_new = torch.where(done.view(-1, 1), b, b_new)
        # adaptive restart (O'Donoghue & Candes): momentum off when the step points back
        back = ((zw - w_new) * (w_new - w)).sum(dim=(1, 2)) + ((zb - b_new) * (b_new - b)).sum(dim=1) > 0
        t_new = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0  # per set: the sets never share a step
        beta = torch.where(back, torch.zeros_like(lam), (t - 1.0) / t_new)
        zw = w_new + beta.view(-1, 1, 1) * (w_new - w)
        zb = b_new + beta.view(-1, 1) * (b_new - b)
        t = torch.where(back, torch.ones_like(t), t_new)
        w, b = w_new, b_new
        iters = torch.where(done, iters, torch.full_like(iters, it))
        if it % 10 == 0 or it == max_iter:
            gw, gb = grads(w, b)
            residual = torch.where(done, residual, _kkt(gw, gb, w, alpha * lam))
            done = done | (residual <= tolerance)
            zw = torch.where(done.view(-1, 1, 1), w, zw)
            zb = torch.where(done.view(-1, 1), b, zb)
            if bool(done.all()):
                break
    return w, b, residual, iters


def elastic_net_paths(
    train: Split, val: Split, test: Split, concept_sets: Mapping[str, torch.Tensor], num_classes: int,
    params: WeightSparsityParams | Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The elastic-net path of the final layer for every concept set (name -> (M, D) unit rows), all sets of one
    size batched. One row per (set, path step): ``lam`` (relative to the set's ``λ_max``), ``nec``, ``val_acc``,
    ``test_acc``, the optimality residual ``kkt`` and ``iterations``."""
    params = WeightSparsityParams.from_params(params or {})
    rows: list[dict[str, Any]] = []
    by_m: dict[int, list[str]] = {}
    for name, v in concept_sets.items():
        by_m.setdefault(int(v.shape[0]), []).append(name)
    for names in by_m.values():
        rows += _paths_of(train, val, test, {n: concept_sets[n] for n in names}, num_classes, params)
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def _paths_of(
    train: Split, val: Split, test: Split, sets: Mapping[str, torch.Tensor], k: int, params: WeightSparsityParams
) -> list[dict[str, Any]]:
    names = list(sets)
    a_tr = torch.stack([_design(train.x, sets[n]) for n in names])
    mean, std = a_tr.mean(dim=1, keepdim=True), a_tr.std(dim=1, keepdim=True).clamp_min(1e-8)
    a_tr = (a_tr - mean) / std
    a_va = (torch.stack([_design(val.x, sets[n]) for n in names]) - mean) / std
    a_te = (torch.stack([_design(test.x, sets[n]) for n in names]) - mean) / std
    y = F.one_hot(train.y.long(), k).to(a_tr.dtype)
    s, n, m = a_tr.shape
    ones = torch.ones(s, n, 1, dtype=a_tr.dtype)
    design = torch.cat([a_tr, ones], dim=2)
    lipschitz = 0.5 * torch.linalg.eigvalsh((design.transpose(1, 2) @ design / n).double())[:, -1].to(a_tr.dtype)
    prior = y.mean(dim=0).clamp_min(1e-12)
    b = prior.log().expand(s, k).clone()
    w = torch.zeros(s, k, m, dtype=a_tr.dtype)
    grad0 = torch.bmm((torch.softmax(b, dim=-1).unsqueeze(1) - y).transpose(1, 2), a_tr) / n
    lam_max = grad0.abs().amax(dim=(1, 2)) / params.alpha * (1 + 1e-6)  # W = 0 optimal, not at the edge
    ratios = np.geomspace(1.0, params.min_ratio, params.path_length)
    rows = []
    top = max(params.nec_levels)
    for step, ratio in enumerate(ratios):
        lam = lam_max * float(ratio)
        w, b, kkt, iters = _fista(a_tr, y, w, b, lam, params.alpha, lipschitz, params.tolerance, params.max_iter)
        nec = (w != 0).sum(dim=(1, 2)).double() / k
        acc = {}
        for split, a, labels in (("val", a_va, val.y), ("test", a_te, test.y)):
            pred = torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2)).argmax(dim=-1)
            acc[split] = (pred == labels.long().view(1, -1)).double().mean(dim=1)
        for i, name in enumerate(names):
            rows.append({"set": name, "step": step, "lam": float(ratio), "nec": float(nec[i]),
                         "val_acc": float(acc["val"][i]), "test_acc": float(acc["test"][i]),
                         "kkt": float(kkt[i]), "iterations": int(iters[i])})
        if bool((nec > top).all()):  # every set is past the largest NEC level: the denser end is never read
            break
    worst = max(r["kkt"] for r in rows)
    if worst > params.tolerance:
        logger.warning("weight-sparsity path: residual %.2e above the tolerance %.0e (raise weight_sparsity.max_iter)",
                       worst, params.tolerance)
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
    within the tolerance). Sets are named as :class:`~iis_study.core.nulls.ConceptDraws` names them, draw 0 of
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
