"""Benchmark: the parts of one truncated-Newton head (issue 31), each variant against the one it replaced.

At the default study's concept-head shape (N = 1,079 training rows, M + 1 = 201 columns, K = 10 classes; random
activations and softmax: the costs depend on the shapes only), on one torch thread (how the solver runs a head):

- the preconditioner's apply: the inverted blocks times a column (``matmul(inv, r[..., None])``, the first apply)
  or a row times them (``bmm``, the blocks are symmetric), against the solver's two triangular solves on the
  Cholesky factor (no inverse);
- the preconditioner's build: the class blocks as one batched product (``bmm``, both triangles), the
  factorisation (``cholesky_ex``) and the inversion the solver no longer does (``cholesky_inverse``);
- for scale, one Hessian-vector product and one float64 loss and gradient.

Prints milliseconds per call (the median of ``--repeats`` timings) and each variant's ratio to its baseline.

Usage::

    PYTHONPATH=src python scripts/bench_newton_parts.py [--repeats 30] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from study_tables import sync_block  # scripts/ is on sys.path when a script runs
from time_interp_step import times_ms

from iis_study.core.solvers import newton


def _ms(fn, repeats: int) -> float:
    return times_ms(fn, repeats)[0]  # the median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--update", metavar="FILE", help="write the table into FILE's <!-- bench_newton_parts --> block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, f, k = 1079, 200, 10
    x = torch.randn(1, n, f, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    design = newton.DenseDesign(x, y, k)
    groups = torch.zeros(1, dtype=torch.long)
    theta = 0.1 * torch.randn(1, k, f + 1, generator=g, dtype=torch.float64)
    lam = torch.full((1,), 1e-3, dtype=torch.float64)
    _, grad, p = newton.loss_grad(design, groups, theta, lam)
    pre = newton.ClassBlocks(design, groups, p, lam)
    r = grad.float()
    f1 = f + 1
    chol64 = pre.chol.double()
    blocks = chol64 @ chol64.transpose(-1, -2)
    inv = torch.cholesky_inverse(chol64).float()  # the inverse the solver applied before
    xa = design.xa32[groups]
    curv = (p * (1 - p)).float()

    def build_bmm():
        w = curv.unsqueeze(2) * xa.transpose(1, 2).contiguous().unsqueeze(1)
        return torch.bmm(w.reshape(-1, k * f1, n), xa)

    rows = []

    def row(part, variant, ms, base):
        line = f"| {part} | {variant} | {ms:.3f} ms | {base / ms:.1f}× |"
        print(line)
        rows.append(line)

    col = _ms(lambda: torch.matmul(inv, r.unsqueeze(-1)), args.repeats)
    row("preconditioner apply (K blocks)", "inverse: block × column (`matmul`), the first apply", col, col)
    h, f1_ = r.shape[0] * k, f1
    row("preconditioner apply (K blocks)", "inverse: row × block (`bmm`; the blocks are symmetric)",
        _ms(lambda: torch.bmm(r.reshape(h, 1, f1_), inv.view(h, f1_, f1_)), args.repeats), col)
    row("preconditioner apply (K blocks)", "factor: two triangular solves (`cholesky_solve`), the solver's",
        _ms(lambda: pre(r), args.repeats), col)
    b = _ms(build_bmm, args.repeats)
    row("preconditioner build", "class blocks, one batched product (`bmm`)", b, b)
    row("preconditioner build", "`cholesky_ex` (float64)", _ms(lambda: torch.linalg.cholesky_ex(blocks), args.repeats), b)
    row("preconditioner build", "`cholesky_inverse` of the factor (float64; the solver no longer inverts)",
        _ms(lambda: torch.cholesky_inverse(chol64), args.repeats), b)
    hv = _ms(lambda: newton.hess_vec(xa, p.float(), r, lam.float(), n), args.repeats)
    row("for scale", "one Hessian-vector product (float32)", hv, b)
    row("for scale", "one loss and gradient (float64)", _ms(lambda: newton.loss_grad(design, groups, theta, lam), args.repeats), b)
    if args.update:
        text = "\n".join([
            f"One head at N = {n}, M + 1 = {f1}, K = {k}, one torch thread; the ratio is to the first row of its part.",
            "",
            "| part | variant | time per call | ratio |",
            "|---|---|---|---|",
            *rows,
        ])
        sync_block(Path(args.update), "bench_newton_parts", text, update=True)


if __name__ == "__main__":
    main()
