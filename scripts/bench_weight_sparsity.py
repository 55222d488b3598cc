"""Benchmark: what the weight-sparsity path (NEC / ANEC) adds to the certified estimator (docs/performance.md).

On one representation of a finished default study (its cached features, concepts and ``concept_draws``), fits
every head of every concept set, draw and null (the convex solve, as ``train_interpreters`` does), then the
final layer's elastic-net path on the same concept sets (as ``fit_weight_sparsity`` does), one after the other
in the same process, and prints both times and their ratio (the issue's budget: at most +50 %).

Usage::

    PYTHONPATH=src python scripts/bench_weight_sparsity.py [--backbone lite0] [--root PROJECT_FOLDER]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import bench_estimators

from iis_study.core.heads import ConceptSpace, HeadsProblem, SweepParams, fit_heads
from iis_study.core.scoring.weight_sparsity import elastic_net_paths
from iis_study.datasets import TensorDictDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--root", default=str(bench_estimators.ROOT), help="a project folder with a finished run")
    args = parser.parse_args()
    bench_estimators.ROOT = Path(args.root)
    inputs = bench_estimators.study_inputs(args.backbone)
    path = Path(args.root) / "data" / "05_model_input" / args.backbone / "concept_draws.safetensors"
    if inputs is None or not path.is_file():
        raise SystemExit("run `make run` first: this benchmark reads the default study's cached features and concepts")
    splits, concepts, k = inputs
    draws = TensorDictDataset(filepath=str(path), object="iis_study.core.concepts.nulls.ConceptDraws").load()
    every = {**concepts, **{n: ConceptSpace(kind="vectors", vectors=v) for n, v in draws.vectors.items()}}
    start = time.perf_counter()
    res = fit_heads(HeadsProblem(splits["train"], splits["val"], splits["test"], every, k),
                    replace(SweepParams(), device="cpu"), progress=False)
    convex = time.perf_counter() - start
    print(f"convex heads: {len(every)} concept sets, {convex:.1f} s, certified: "
          f"{all(r.certificate.certified for r in res.values())}")
    start = time.perf_counter()
    paths = elastic_net_paths(splits["train"], splits["val"], splits["test"],
                              {n: s.vectors for n, s in every.items()}, k)
    path_time = time.perf_counter() - start
    print(f"weight-sparsity path: {paths['set'].nunique()} concept sets x {paths['step'].nunique()} strengths, "
          f"{path_time:.1f} s, largest residual {paths['kkt'].max():.1e}, iterations {int(paths['iterations'].sum())}")
    print(f"the path adds {100 * path_time / convex:.0f} % to the convex solve")


if __name__ == "__main__":
    main()
