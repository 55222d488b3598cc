"""Per-step timing of the batched sweep's train step (bench_sweep's FULL sizes, one seed).

Times, on random data (N=10k x D=1280, M=200, K=10, batch 1024, 8 sparsities x 3 lrs):

  * ``step``: one train step on a fixed minibatch (forward of probe + interp heads, cross-entropy
    via ``F.cross_entropy`` as the earlier ``heads.train_epoch`` did -- the sweep now uses the
    fused ``_SumCrossEntropy`` --, backward, stacked Adam);
  * ``interp fwd+bwd``: only ``InterpHeads`` forward and backward on a fixed minibatch;
  * ``eval fwd``: the interp heads' forward on a chunk of 1024 without grad (as ``correct``).

for the fused numba kernel and then for the torch path (``IIS_FUSED=0``), in one process
(the fused path first: after the torch path's large temporaries later code ran slower)::

    PYTHONPATH=src python scripts/time_interp_step.py [--reps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from iis_study.core import heads as H
from iis_study.core.heads.activations import precompute_base
from iis_study.core.heads.batched import BatchedHeads, StackedAdam
from iis_study.core.heads.masks import InterpHeads


def times_ms(fn, reps: int) -> tuple[float, float]:
    """Median and minimum wall time of ``fn`` in ms (after two warm-up calls)."""
    fn()  # warm-up (and JIT compilation)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    n, d, m, k_cls, bsz = 10_000, 1280, 200, 10, 1024
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k_cls, (n,), generator=g)
    vectors = F.normalize(torch.randn(m, d, generator=g), dim=1)
    concepts = H.ConceptSpace("vectors", vectors=vectors)
    cfg = H.SweepParams(seeds=(0,), epochs=1, batch_size=bsz)
    heads = BatchedHeads(concepts, cfg, d, k_cls)
    opt = StackedAdam(heads.params, heads.lr_axis(), cfg.learning_rates)
    base = precompute_base(x, concepts)
    idx = torch.randperm(n, generator=g)[:bsz][None]
    xb, bb, yb = x[idx], base[idx], y[idx]

    def step() -> None:
        lp, li = heads.forward(xb, bb, train=True)
        lp.register_hook(H.flush_denormals)
        li.register_hook(H.flush_denormals)
        loss = F.cross_entropy(
            lp.reshape(-1, k_cls), yb[:, None].expand(lp.shape[:3]).reshape(-1), reduction="sum"
        )
        loss = loss + F.cross_entropy(
            li.reshape(-1, k_cls), yb[None, :, None].expand(li.shape[:4]).reshape(-1), reduction="sum"
        )
        opt.zero_grad()
        (loss / bsz).backward()
        opt.step()

    p = heads.params
    lnw = p["interp.ln_weight"].unsqueeze(-2)
    lnb = p["interp.ln_bias"].unsqueeze(-2)
    up = torch.randn(p["interp.weight"].shape[:3] + (bsz, k_cls), generator=g) / bsz

    def interp() -> None:
        out = InterpHeads.apply(
            bb[None, :, None], lnw, lnb, p["interp.weight"], p["interp.bias"], tuple(heads.k)
        )
        torch.autograd.grad(out, [lnw, lnb, p["interp.weight"], p["interp.bias"]], up)

    def eval_fwd() -> None:
        with torch.no_grad():
            InterpHeads.apply(
                bb[None, :, None], lnw, lnb, p["interp.weight"], p["interp.bias"], tuple(heads.k)
            )

    print(f"torch threads={torch.get_num_threads()}; median / min of {args.reps} [ms]")
    print(f"{'':<16}{'fused':>18}{'torch path':>18}")
    rows = {}
    for fused in ("1", "0"):
        os.environ["IIS_FUSED"] = fused
        for name, fn in (("step", step), ("interp fwd+bwd", interp), ("eval fwd", eval_fwd)):
            rows.setdefault(name, []).append(times_ms(fn, args.reps))
    for name, vals in rows.items():
        cells = "".join(f"{med:10.2f} /{best:6.2f}" for med, best in vals)
        print(f"{name:<16}{cells}")


if __name__ == "__main__":
    main()
