"""Benchmark: the convex heads' solvers in one process (issue 31): truncated Newton against L-BFGS and scikit-learn.

On the default study's Lite0 (``make run`` first: its cached features, concepts and concept draws), every head of
every concept set (the study's 2 and the 16 draws and nulls: 18 sets x 8 sparsities x 5 strengths = 720 heads) is
solved by ``solver="lbfgs"`` (the baseline) and ``solver="newton"`` one after the other, and a sample of heads by
scikit-learn's ``LogisticRegression`` (``newton-cholesky`` and ``lbfgs``, one head at a time, extrapolated to all
720). Then the same on a synthetic K = 100 shape. Prints times, ratios, steps, Hessian-vector products, the largest
objective difference and whether every head is certified.

Usage::

    PYTHONPATH=src python scripts/bench_solvers.py [--backbone lite0] [--skip-sklearn] [--sets 18]
"""

from __future__ import annotations

import argparse
import time
import torch
from bench_estimators import _study_sets

from iis_study.core.heads import SweepParams
from iis_study.core.heads.convex import ConceptDesign, _activations
from iis_study.core.heads.lbfgs import solve_logistic
from iis_study.core.heads.masks import n_dropped


def _solve(design, k, cfg, solver):
    start = time.perf_counter()
    fit = solve_logistic(design, k, cfg.l2_grid, tol=cfg.tolerance, max_iter=cfg.max_iter, solver=solver)
    return fit, time.perf_counter() - start


def _report(name, fit, seconds, base=None):
    its = fit.iterations
    line = (f"  {name:<8} {seconds:7.1f} s  certified {bool(fit.certified.all())}  largest gradient "
            f"{float(fit.grad.max()):.1e}  steps per head mean {float(its.double().mean()):.1f} max {int(its.max())}")
    if fit.products is not None and int(fit.products.sum()):
        line += f"  Hessian-vector products per head {float(fit.products.double().mean()):.0f}"
    if base is not None:
        line += f"  speed-up {base / seconds:.1f}x"
    print(line)


def _sklearn(design, k, cfg, groups, solver):
    from sklearn.linear_model import LogisticRegression

    x, y = next(design.blocks(torch.arange(design.groups), torch.float64))
    start, n = time.perf_counter(), 0
    for g in groups:
        for c in cfg.l2_grid:
            LogisticRegression(C=c, solver=solver, tol=1e-8, max_iter=100_000).fit(x[g].numpy(), y.numpy())
            n += 1
    return (time.perf_counter() - start) / n


def _compare(design, k, cfg, skip_sklearn, label):
    heads = design.groups * len(cfg.l2_grid)
    print(f"{label}: {design.groups} head groups x {len(cfg.l2_grid)} strengths = {heads} heads, N = {design.n}, "
          f"M = {design.features}, K = {k}")
    lb, t_lb = _solve(design, k, cfg, "lbfgs")
    _report("lbfgs", lb, t_lb)
    nt, t_nt = _solve(design, k, cfg, "newton")
    _report("newton", nt, t_nt, base=t_lb)
    print(f"  largest objective difference newton - lbfgs: {float((nt.loss - lb.loss).max()):+.1e} "
          f"(most negative {float((nt.loss - lb.loss).min()):+.1e})")
    if not skip_sklearn:
        sample = list(range(0, design.groups, max(1, design.groups // 4)))[:4]
        for solver in ("newton-cholesky", "lbfgs"):
            per = _sklearn(design, k, cfg, sample, solver)
            print(f"  scikit-learn {solver}: {per:.2f} s per head on {len(sample) * len(cfg.l2_grid)} heads -> "
                  f"{per * heads:.0f} s for all {heads} (one head at a time)")
    return t_lb, t_nt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--sets", type=int, default=18, help="concept sets of the study to solve (18: all)")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()
    cfg = SweepParams(device="cpu")
    splits, concepts, draws, k = _study_sets(args.backbone)
    spaces = list(concepts.values()) + list(draws.values())
    spaces = spaces[: args.sets]
    train = splits["train"]
    keeps = [spaces[0].m - n_dropped(s, spaces[0].m) for s in cfg.sparsities]
    design = ConceptDesign([_activations(train, sp, "cpu") for sp in spaces], keeps, train.y.long())
    _compare(design, k, cfg, args.skip_sklearn, f"{args.backbone}, {len(spaces)} concept sets")

    g = torch.Generator().manual_seed(0)
    k100, n, m = 100, 3000, 200
    y = torch.arange(n) % k100
    means = torch.randn(k100, m, generator=g)
    a = means[y] + 2.0 * torch.randn(n, m, generator=g)
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    sparsities = (0.0, 0.9)
    syn = ConceptDesign([a], [m - n_dropped(s, m) for s in sparsities], y)
    _compare(syn, k100, SweepParams(device="cpu", l2_grid=(0.1, 1.0, 10.0)), args.skip_sklearn,
             "synthetic K = 100 (C = 0.1, 1, 10)")


if __name__ == "__main__":
    main()
