"""The convex solver at ImageNet shape: time per iteration and peak memory against N (issue 22).

Synthetic LayerNorm-standardised concept activations (2 concept types x M = 200, the default 8
sparsities: 16 head groups) and K = 1,000 classes; the design is streamed in row blocks (never
materialised), as it is for a training set too large for memory. For each N (one subprocess each,
so that the peak resident memory is that N's alone) the script times the set-up (ranks, Gram
matrices, preconditioners) and one evaluation of every head's loss and gradient (what one L-BFGS
iteration costs, line search aside), and reads the process's peak resident memory.

Usage::

    PYTHONPATH=src python scripts/bench_convex_scale.py                 # N = 20k, 50k, 100k, 200k
    PYTHONPATH=src python scripts/bench_convex_scale.py --n 20000 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

K, M, TYPES = 1000, 200, 2
SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)


def one(n: int) -> dict:
    import torch

    from iis_study.core.heads import convex
    from iis_study.core.solvers.lbfgs import PRECOND_SCALE, gram_matrices, objective, preconditioners
    from iis_study.core.heads.masks import n_dropped

    convex.MATERIALISE_BYTES = 0  # stream, as for a large training set
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (n,), generator=g)
    bases = [torch.nn.functional.layer_norm(torch.randn(n, M, generator=g), (M,)) for _ in range(TYPES)]
    t0 = time.perf_counter()
    design = convex.ConceptDesign(bases, [M - n_dropped(s, M) for s in SPARSITIES], y)
    groups = torch.arange(design.groups)
    inv_cn = torch.tensor([1.0 / (1.0 * n)], dtype=torch.float64)
    pinv = preconditioners(gram_matrices(design, groups), n, inv_cn, PRECOND_SCALE / K)
    setup = time.perf_counter() - t0
    theta = torch.zeros(design.groups, 1, K * (M + 1), dtype=torch.float64)
    t0 = time.perf_counter()
    loss, grad = objective(design, theta, groups, inv_cn, K, torch.float64)
    per_iter = time.perf_counter() - t0
    assert torch.isfinite(loss).all() and pinv.shape[0] == design.groups
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    flops = 4.0 * design.groups * n * (M + 1) * K
    return {"n": n, "setup_s": setup, "iteration_s": per_iter, "peak_gib": peak, "gflop_per_iteration": flops / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[20_000, 50_000, 100_000, 200_000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"K = {K}, {TYPES} concept types x M = {M} x {len(SPARSITIES)} sparsities = {TYPES * len(SPARSITIES)} head "
          "groups, one L2 strength, float64, streamed blocks")
    print(f"{'N':>8} {'set-up s':>9} {'s / iteration':>14} {'GFLOP / it.':>12} {'peak GiB':>9}")
    for n in args.n:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n']:>8} {r['setup_s']:>9.1f} {r['iteration_s']:>14.2f} {r['gflop_per_iteration']:>12.0f} "
              f"{r['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
