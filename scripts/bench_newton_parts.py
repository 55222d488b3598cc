"""Benchmark: the parts of one truncated-Newton head (issue 31), the CPU's compiled kernels against the batched
torch forms a GPU runs.

At the default study's concept-head shape (N = 1,079 training rows, M + 1 = 201 columns, K = 10 classes; random
activations and softmax: the costs depend on the shapes and on how many concepts a row keeps), one head on one
thread (torch's and scipy's BLAS both limited to one, as the solver's workers run):

- the preconditioner's build: the class blocks as one batched product (``torch.bmm``, both triangles) and their
  float64 factorisation (``cholesky_ex``), against the compiled build (``kernels.class_factors``: one triangle by
  BLAS ``ssyrk``, or from the rows' nonzero entries where a row keeps few concepts, and a float32 ``spotrf``);
- one conjugate-gradient iteration (a Hessian-vector product, a preconditioner application and the vector
  updates): the batched torch CG (``newton.batched_conjugate_gradients``) against the compiled one
  (``kernels.conjugate_gradients``), dense and sparse, run for a fixed number of iterations;
- for scale, one float64 loss and gradient.

Prints milliseconds per call (the median of ``--repeats`` timings) and each variant's ratio to its baseline.

Usage::

    PYTHONPATH=src python scripts/bench_newton_parts.py [--repeats 30] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (scipy's own BLAS, loaded before threadpool_limits so it is limited too)
import torch
from study_tables import sync_block  # scripts/ is on sys.path when a script runs
from threadpoolctl import threadpool_limits
from time_interp_step import times_ms

from iis_study.core.solvers import kernels, newton


def _ms(fn, repeats: int) -> float:
    return times_ms(fn, repeats)[0]  # the median


def _masked(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Each row's ``keep`` largest |x| kept, the rest zero (as the study's sparsity masks)."""
    drop = x.abs().argsort(dim=-1, descending=True)[..., keep:]
    return x.scatter(-1, drop, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--update", metavar="FILE", help="write the table into FILE's <!-- bench_newton_parts --> block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, f, k, cg_iters = 1079, 200, 10, 20
    y = torch.arange(n) % k
    groups = torch.zeros(1, dtype=torch.long)
    lam = torch.full((1,), 1e-3, dtype=torch.float64)
    eta = torch.zeros(1, dtype=torch.float64)  # never met: every CG runs cg_iters iterations
    x = torch.randn(1, n, f, generator=g, dtype=torch.float64)
    theta = 0.1 * torch.randn(1, k, f + 1, generator=g, dtype=torch.float64)
    theta -= theta.mean(dim=1, keepdim=True)
    rows = []

    def row(part, variant, ms, base):
        line = f"| {part} | {variant} | {ms:.3f} ms | {base / ms:.1f}× |"
        print(line)
        rows.append(line)

    with threadpool_limits(1, user_api="blas"):
        build = cg = None
        for keep in (f, 20, 4):
            design = newton.DenseDesign(_masked(x, keep), y, k)
            _, grad, p = newton.loss_grad(design, groups, theta, lam)
            pre = newton.ClassBlocks(design, groups, p, lam)
            xa = design.xa32[0].numpy()
            curv = (p[0] * (1 - p[0])).float().numpy()
            out = np.empty((k, f + 1, f + 1), np.float32)
            dense = kernels.RowDesign(xa, sparse_build=0.0, sparse_products=0.0)
            packed = kernels.RowDesign(xa, sparse_build=1.0, sparse_products=1.0)
            kept = f"{keep} of {f} concepts a row"
            if keep == f:
                blocks = torch.empty(1, k, f + 1, f + 1)
                xa_t, curv_t = design.xa32[groups], (p * (1 - p)).float()

                def build_torch():
                    w = curv_t.unsqueeze(2) * xa_t.transpose(1, 2).contiguous().unsqueeze(1)
                    blocks[:] = torch.bmm(w.reshape(-1, k * (f + 1), n), xa_t).view(1, k, f + 1, f + 1)
                    return newton.factor64(blocks, n, lam)

                build = _ms(build_torch, args.repeats)
                row("preconditioner build and factor", f"{kept}: `bmm` and float64 `cholesky_ex` (the GPU's)",
                    build, build)
            row("preconditioner build and factor", f"{kept}: compiled, dense (`ssyrk`, float32 `spotrf`)",
                _ms(lambda: kernels.class_factors(dense, curv, out, 1.0 / n, 1e-3), args.repeats), build)
            if keep < f:
                row("preconditioner build and factor", f"{kept}: compiled, the rows' nonzero entries",
                    _ms(lambda: kernels.class_factors(packed, curv, out, 1.0 / n, 1e-3), args.repeats), build)
            b, chol = (-grad[0]).float().numpy(), pre.chol[0].numpy()
            if keep == f:
                cg = _ms(lambda: newton.batched_conjugate_gradients(
                    design, groups, p.float(), pre, lam, grad, eta, 0.0, cg_iters), args.repeats) / cg_iters
                row("one CG iteration", f"{kept}: batched torch (the GPU's)", cg, cg)
            for name, rd in (("dense", dense), ("the rows' nonzero entries", packed)):
                if keep == f and rd is packed:
                    continue
                ms = _ms(lambda: kernels.conjugate_gradients(rd, p[0].float().numpy(), chol, 1e-3, b, 0.0, 0.0,
                                                             cg_iters), args.repeats) / cg_iters
                row("one CG iteration", f"{kept}: compiled, {name}", ms, cg)
        design = newton.DenseDesign(x, y, k)
        row("for scale", "one float64 loss and gradient (torch)",
            _ms(lambda: newton.loss_grad(design, groups, theta, lam), args.repeats), build)
    if args.update:
        text = "\n".join([
            f"One head at N = {n}, M + 1 = {f + 1}, K = {k}, one thread; the ratio is to the first row of its part (for "
            "scale: to the build).",
            "",
            "| part | variant | time per call | ratio |",
            "|---|---|---|---|",
            *rows,
        ])
        sync_block(Path(args.update), "bench_newton_parts", text, update=True)


if __name__ == "__main__":
    main()
