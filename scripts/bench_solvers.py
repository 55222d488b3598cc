"""Benchmark: the convex heads' solvers in one process (issue 31): truncated Newton against L-BFGS and scikit-learn.

On the default study's Lite0 (``make run`` first: its cached features, concepts and concept draws), every head of
every concept set (the study's 2 and the 16 draws and nulls: 18 sets x 8 sparsities x 5 strengths = 720 heads) is
solved by ``solver="lbfgs"`` (the baseline), by ``solver="newton"`` with every head of a level in one call and no
worker pool (the objective batched on torch's threads, the compiled CPU kernels head after head) and by
``solver="newton"`` as the study runs it (one
head a call on a pool of threads), one after the other, and a sample of heads by
scikit-learn's ``LogisticRegression`` (``newton-cholesky`` and ``lbfgs``, one head at a time, extrapolated to all
720). Then L-BFGS and Newton on a synthetic K = 100 shape (no scikit-learn there: its ``newton-cholesky`` would
form a 20,100-square Hessian per head). Prints times, ratios, steps, Hessian-vector products, the largest
objective difference and whether every head is certified.

Usage::

    PYTHONPATH=src python scripts/bench_solvers.py [--backbone lite0] [--sklearn-groups 1] [--sets 18]
        [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_estimators import study_sets
from study_tables import sync_block  # scripts/ is on sys.path when a script runs

from iis_study.core.heads import SweepParams
from iis_study.core.heads.convex import ConceptDesign, concept_activations
from iis_study.core.solvers import lbfgs
from iis_study.core.solvers.lbfgs import solve_logistic
from iis_study.core.heads.masks import n_dropped


def _solve(design, k, cfg, solver):
    """``solver`` lbfgs or newton as the study runs them; ``newton-batched``: Newton with every head of a level in
    one call and no worker pool (the objective and line search batched on torch's threads, the CPU's compiled
    kernels head after head; a GPU batches the kernels' work too)."""
    batched = solver.endswith("-batched")
    inner = lbfgs.newton_heads
    if batched:
        lbfgs.newton_heads = lambda pool, *args: inner(None, *args)
    try:
        start = time.perf_counter()
        fit = solve_logistic(design, k, cfg.l2_grid, tol=cfg.tolerance, max_iter=cfg.max_iter,
                             solver=solver.removesuffix("-batched"))
        return fit, time.perf_counter() - start
    finally:
        lbfgs.newton_heads = inner


def _row(shape, name, fit, seconds, base):
    its = fit.iterations
    products = f"{float(fit.products.double().mean()):.0f}" if fit.products is not None and int(fit.products.sum()) else "—"
    row = (f"| {shape} | {name} | {seconds:.1f} s | {'yes' if bool(fit.certified.all()) else '**no**'} "
           f"({float(fit.grad.max()):.1e}) | {float(its.double().mean()):.1f} / {int(its.max())} | {products} "
           f"| {base / seconds:.1f}× |")
    print(row)
    return row


def _sklearn(design, k, cfg, groups, solver):
    from sklearn.linear_model import LogisticRegression

    x, y = next(design.blocks(torch.arange(design.groups), torch.float64))
    start, n = time.perf_counter(), 0
    for g in groups:
        for c in cfg.l2_grid:
            LogisticRegression(C=c, solver=solver, tol=1e-8, max_iter=100_000).fit(x[g].numpy(), y.numpy())
            n += 1
    return (time.perf_counter() - start) / n


def _compare(design, k, cfg, sklearn_groups, label):
    """The table rows of one shape: L-BFGS (the baseline), Newton, scikit-learn per head (extrapolated)."""
    heads = design.groups * len(cfg.l2_grid)
    shape = f"{label}: {heads} heads (N {design.n}, M {design.features}, K {k})"
    print(shape)
    lb, t_lb = _solve(design, k, cfg, "lbfgs")
    rows = [_row(shape, "L-BFGS (`lbfgs`), the baseline", lb, t_lb, t_lb)]
    nb, t_nb = _solve(design, k, cfg, "newton-batched")
    rows.append(_row(shape, "truncated Newton, every head of a level in one call, no worker pool", nb, t_nb, t_lb))
    nt, t_nt = _solve(design, k, cfg, "newton")
    rows.append(_row(shape, "truncated Newton (`newton`), one head a call on a thread pool (the study's)", nt, t_nt,
                     t_lb))
    diff = nt.loss - lb.loss
    print(f"  objective newton - lbfgs: {float(diff.min()):+.1e} to {float(diff.max()):+.1e}")
    if sklearn_groups:
        sample = list(range(0, design.groups, max(1, design.groups // sklearn_groups)))[:sklearn_groups]
        for solver in ("newton-cholesky", "lbfgs"):
            per = _sklearn(design, k, cfg, sample, solver)
            n = len(sample) * len(cfg.l2_grid)
            row = (f"| {shape} | scikit-learn `{solver}`, one head at a time ({n} heads timed, × {heads}) "
                   f"| {per * heads:.0f} s | — | — | — | {t_lb / (per * heads):.2f}× |")
            print(row)
            rows.append(row)
    return rows, (float(diff.min()), float(diff.max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--sets", type=int, default=18, help="concept sets of the study to solve (18: all)")
    parser.add_argument("--sklearn-groups", type=int, default=1,
                        help="head groups timed with scikit-learn, every strength of each (0: none)")
    parser.add_argument("--update", metavar="FILE", help="write the table into FILE's <!-- bench_solvers --> block")
    args = parser.parse_args()
    cfg = SweepParams(device="cpu")
    splits, concepts, draws, k = study_sets(args.backbone)
    spaces = list(concepts.values()) + list(draws.values())
    spaces = spaces[: args.sets]
    train = splits["train"]
    keeps = [spaces[0].m - n_dropped(s, spaces[0].m) for s in cfg.sparsities]
    design = ConceptDesign([concept_activations(train, sp, "cpu") for sp in spaces], keeps, train.y.long())
    rows, gap = _compare(design, k, cfg, args.sklearn_groups, f"{args.backbone}, {len(spaces)} concept sets")

    g = torch.Generator().manual_seed(0)
    k100, n, m = 100, 3000, 200
    y = torch.arange(n) % k100
    means = torch.randn(k100, m, generator=g)
    a = means[y] + 2.0 * torch.randn(n, m, generator=g)
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    sparsities = (0.0, 0.9)
    syn = ConceptDesign([a], [m - n_dropped(s, m) for s in sparsities], y)
    # no scikit-learn here: its newton-cholesky would build and factor a 20,100-square Hessian per head
    rows += _compare(syn, k100, SweepParams(device="cpu", l2_grid=(0.1, 1.0, 10.0)), 0, "synthetic, C = 0.1, 1, 10")[0]
    if args.update:
        text = "\n".join([
            "| shape | solver | time | every head certified (largest gradient) | steps per head (mean / max) "
            "| Hessian-vector products per head | speed-up over L-BFGS |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Objective values, Newton minus L-BFGS, on {args.backbone}'s heads: {gap[0]:+.1e} to {gap[1]:+.1e}.",
        ])
        sync_block(Path(args.update), "bench_solvers", text, update=True)


if __name__ == "__main__":
    main()
