"""Benchmark: the weight-sparsity path's solvers in one process (issue 31): proximal Newton against FISTA.

On the default study's cached features, concepts and concept draws (``make run`` first), the elastic-net path of
every concept set of a representation (its 2 concept sets and their 16 draws and nulls, as the study runs them:
one set a call on a pool of threads) is solved with ``weight_sparsity.solver: fista`` (the baseline) and with
``newton`` (the compiled proximal Newton), one after the other. Prints the time, the points solved, the iterations (FISTA) or Newton steps per point, the
largest optimality residual (the certificate: <= the tolerance), whether the two paths select the same models (NEC and
val accuracy per point) and the largest ANEC-avg difference.

Usage::

    PYTHONPATH=src python scripts/bench_path.py [--backbone lite0 lite0_stage1] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_estimators import study_sets
from study_tables import sync_block  # scripts/ is on sys.path when a script runs

from iis_study.core.scoring.blocks import WeightSparsityParams
from iis_study.core.scoring.weight_sparsity import anec, elastic_net_paths


def _run(splits, sets, k, solver):
    """``solver`` fista or newton, as the study runs it (one set a call on the thread pool)."""
    params = WeightSparsityParams(solver=solver)
    start = time.perf_counter()
    path = elastic_net_paths(splits["train"], splits["val"], splits["test"], sets, k, params)
    return path, time.perf_counter() - start, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["lite0", "lite0_stage1"])
    parser.add_argument("--update", metavar="FILE", help="write the table into FILE's <!-- bench_path --> block")
    args = parser.parse_args()
    rows = []
    for backbone in args.backbone:
        splits, concepts, draws, k = study_sets(backbone)
        sets = {f"draw/{t}/0": sp.vectors for t, sp in concepts.items()} | {n: sp.vectors for n, sp in draws.items()}
        shape = f"{backbone}: {len(sets)} sets (N {splits['train'].x.shape[0]}, M {next(iter(sets.values())).shape[0]}, K {k})"
        print(shape)
        paths, base = {}, None
        for solver, label in (("fista", "FISTA, the baseline"), ("newton", "proximal Newton (the study's)")):
            path, seconds, params = _run(splits, sets, k, solver)
            paths[solver] = path
            base = base or seconds
            certified = bool((path["kkt"] <= params.tolerance).all())
            row = (f"| {shape} | {label} | {seconds:.1f} s | {len(path)} | "
                   f"{path['iterations'].mean():.1f} / {path['iterations'].max()} | "
                   f"{'yes' if certified else '**no**'} ({path['kkt'].max():.1e}) | {base / seconds:.1f}× |")
            print(row)
            rows.append(row)
        f, n = paths["fista"], paths["newton"]
        merged = f.merge(n, on=["set", "step"], suffixes=("_f", "_n"))
        same_nec = float((merged["nec_f"] == merged["nec_n"]).mean())
        levels = WeightSparsityParams().nec_levels
        gaps = [abs(anec(f[f["set"] == s], levels)[1] - anec(n[n["set"] == s], levels)[1]) for s in sets]
        note = (f"{backbone}: points {len(f)} (FISTA) vs {len(n)} (Newton); same NEC at {100 * same_nec:.1f} % of "
                f"the common points; largest ANEC-avg difference {max(gaps):.4f} (mean {np.mean(gaps):.5f})")
        print(note)
        rows.append(f"| {note} |||||||")
    if args.update:
        text = "\n".join([
            "| shape | solver | time | points | iterations or Newton steps per point (mean / max) "
            "| every point certified (largest residual) | speed-up over FISTA |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ])
        sync_block(Path(args.update), "bench_path", text, update=True)


if __name__ == "__main__":
    main()
