"""Benchmark: the Newton solver's warm start along the nested sparsity masks, against the same solve from zero.

On the default study's Lite0 (``make run`` first), the heads of 1, 2, 5 and all 18 of its concept sets (8
sparsities x 5 strengths each) are solved with ``solve_logistic(..., nested=False)`` (the baseline: every head
of the strongest penalty from zero) and with the default ``nested=True``, one after the other in one process;
then the conjugate gradients' forcing term (``newton.FORCING``) at four values on 6 sets. Prints time, Newton
steps, Hessian-vector products a head (all strengths, and per strength) and how many test predictions' correctness
differ between the two solves (both certified: they differ only within the tolerance).

Usage::

    PYTHONPATH=src python scripts/bench_nested.py [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_estimators import study_sets
from study_tables import sync_block  # scripts/ is on sys.path when a script runs

from iis_study.core.heads import SweepParams
from iis_study.core.heads.convex import ConceptDesign, concept_activations, correct_predictions
from iis_study.core.heads.masks import n_dropped
from iis_study.core.solvers import newton
from iis_study.core.solvers.lbfgs import solve_logistic

SETS = (1, 2, 5, 18)
FORCING = (0.05, 0.1, 0.3, 0.5)
FORCING_SETS = 6


def _designs(splits, spaces, cfg):
    keeps = [spaces[0].m - n_dropped(s, spaces[0].m) for s in cfg.sparsities]
    return {s: ConceptDesign([concept_activations(splits[s], sp, "cpu") for sp in spaces], keeps, splits[s].y.long())
            for s in ("train", "test")}


def _solve(design, k, cfg, **kw):
    start = time.perf_counter()
    fit = solve_logistic(design, k, cfg.l2_grid, tol=cfg.tolerance, max_iter=cfg.max_iter, **kw)
    return fit, time.perf_counter() - start


def _cells(fit, seconds) -> str:
    pr = fit.products.double()
    per_c = " / ".join(f"{float(pr[:, li].mean()):.0f}" for li in range(pr.shape[1]))
    return (f"{seconds:.1f} s | {'yes' if bool(fit.certified.all()) else '**no**'} | "
            f"{float(fit.iterations.double().mean()):.2f} | {float(pr.mean()):.1f} ({per_c})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--update", metavar="FILE", help="write the tables into FILE's <!-- bench_nested --> block")
    args = parser.parse_args()
    cfg = SweepParams(device="cpu")
    splits, concepts, draws, k = study_sets(args.backbone)
    spaces = list(concepts.values()) + list(draws.values())
    rows = [
        "| concept sets (heads) | start at the strongest penalty | time | every head certified | Newton steps a head "
        "| Hessian-vector products a head (per C: " + " / ".join(f"{c:g}" for c in cfg.l2_grid) + ") "
        "| test images whose correctness differs (of all heads') |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_sets in SETS:
        des = _designs(splits, spaces[:n_sets], cfg)
        heads = des["train"].groups * len(cfg.l2_grid)
        cold, t_cold = _solve(des["train"], k, cfg, nested=False)
        warm, t_warm = _solve(des["train"], k, cfg)
        differ = correct_predictions(des["test"], cold.weight, cold.bias) != correct_predictions(
            des["test"], warm.weight, warm.bias)
        rows.append(f"| {n_sets} ({heads}) | from zero (`nested=False`) | {_cells(cold, t_cold)} | — |")
        rows.append(f"| {n_sets} ({heads}) | the next lower sparsity's solution (default) | {_cells(warm, t_warm)} "
                    f"| {int(differ.sum())} of {differ.numel()} |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    rows += ["", f"The conjugate gradients' forcing term (`newton.FORCING`; the default {newton.FORCING}), "
             f"{FORCING_SETS} concept sets:", "",
             "| forcing | time | every head certified | Newton steps a head | Hessian-vector products a head |",
             "|---|---|---|---|---|"]
    des = _designs(splits, spaces[:FORCING_SETS], cfg)
    default = newton.FORCING
    try:
        for forcing in FORCING:
            newton.FORCING = forcing
            fit, seconds = _solve(des["train"], k, cfg)
            rows.append(f"| {forcing:g} | {_cells(fit, seconds)} |")
            print(rows[-1], flush=True)
    finally:
        newton.FORCING = default
    if args.update:
        sync_block(Path(args.update), "bench_nested", "\n".join(rows), update=True)


if __name__ == "__main__":
    main()
