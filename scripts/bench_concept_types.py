"""Benchmark: several concept types of one representation trained as one batched sweep.

The study scores every representation with several concept types (prototype and cluster by
default). Times, in the same process and on the same synthetic features (learnable Gaussian
classes, random unit concept vectors):

  (a) the baseline: one ``sweep`` per concept type, one after another (each trains its own
      copy of the linear probe);
  (b) ``sweep_many``: every concept type's heads in the same minibatch steps, the probe once,
      concept types of equal M stacked into one call of the fused heads;

checks that (b) gives every concept type the result of its own sweep bit for bit, and prints
the speed-up (b) over (a). Both run once on a tiny budget first (numba kernels compiled and
loaded), so the times are warm.

Usage::

    PYTHONPATH=src python scripts/bench_concept_types.py              # 1.2k/400/400 x 1280, M = 200, 2 types
    PYTHONPATH=src python scripts/bench_concept_types.py --types 3 --steps 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from iis_study.core.heads import ConceptSpace, Split, SweepParams, sweep, sweep_many


def make_data(n: tuple[int, int, int], dim: int, classes: int, seed: int = 0) -> tuple[Split, Split, Split]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 0.15
    common = torch.randn(dim, generator=g) * 3.0  # raw features share one strong direction, as real ones do

    def split(rows: int) -> Split:
        y = torch.arange(rows) % classes
        return Split(centres[y] + common + torch.randn(rows, dim, generator=g), y)

    return split(n[0]), split(n[1]), split(n[2])


def identical(a, b) -> bool:
    try:
        for name in ("table", "selected", "history"):
            pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    except AssertionError:
        return False
    return (
        np.array_equal(a.test_correct, b.test_correct)
        and a.state.keys() == b.state.keys()
        and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", type=int, default=2, help="number of concept types (default 2)")
    ap.add_argument("--m", type=int, default=200, help="concepts per type (default 200)")
    ap.add_argument("--steps", type=int, default=4000, help="sweep.steps (default 4000, the study's budget)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    train, val, test = make_data((1200, 400, 400), 1280, 10)
    g = torch.Generator().manual_seed(1)
    spaces = {
        f"type{t}": ConceptSpace("vectors", vectors=F.normalize(torch.randn(args.m, 1280, generator=g), dim=1))
        for t in range(args.types)
    }
    data = (train, val, test)
    warm = SweepParams(steps=16, seeds=(0,))
    sweep_many(*data, spaces, 10, warm, progress=False)
    sweep(*data, next(iter(spaces.values())), 10, warm, progress=False)

    cfg = SweepParams(steps=args.steps, seeds=tuple(range(args.seeds)))
    t0 = time.perf_counter()
    apart = {name: sweep(*data, space, 10, cfg, progress=False) for name, space in spaces.items()}
    t_apart = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = sweep_many(*data, spaces, 10, cfg, progress=False)
    t_together = time.perf_counter() - t0
    budget = together[next(iter(spaces))].budget
    same = all(identical(apart[n], together[n]) for n in spaces)
    print(
        f"{args.types} concept types x (M = {args.m}), {args.seeds} seeds, N_train = 1,200, D = 1,280: "
        f"batch {budget.batch_size} x {budget.epochs} epochs = {budget.steps} steps"
    )
    print(f"  one sweep per type : {t_apart:7.1f} s")
    print(f"  sweep_many         : {t_together:7.1f} s   speed-up {t_apart / t_together:.2f}x")
    print(f"  results identical bit for bit: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
