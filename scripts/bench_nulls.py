"""Benchmark: what concept draws and nulls cost in the convex solve (docs/performance.md).

On one representation of the default study (``make run`` first: its cached features, concepts and
``concept_draws``), fits the heads of the study's two concept sets alone, then with every extra draw and
null set stacked into the same batched solve (as the interpretability pipeline does), one after the other
in the same process, and prints both times, their ratio and the ratio of concept sets.

Usage::

    PYTHONPATH=src python scripts/bench_nulls.py [--backbone lite0]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from bench_estimators import study_sets

from iis_study.core.heads import HeadsProblem, SweepParams, fit_heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    args = parser.parse_args()
    splits, concepts, draws, k = study_sets(args.backbone)
    every = {**concepts, **draws}
    cfg = replace(SweepParams(), device="cpu")
    times = {}
    for name, sets in (("study's concept sets", concepts), ("with draws and nulls", every)):
        start = time.perf_counter()
        res = fit_heads(HeadsProblem(splits["train"], splits["val"], splits["test"], sets, k), cfg, progress=False)
        times[name] = time.perf_counter() - start
        certified = all(r.certificate.certified for r in res.values())
        print(f"{name}: {len(sets)} concept sets, {times[name]:.1f} s, every head certified: {certified}")
    a, b = times.values()
    print(f"ratio {b / a:.1f}x the time for {len(every) / len(concepts):.0f}x the concept sets")


if __name__ == "__main__":
    main()
