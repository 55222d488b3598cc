"""Compile the CPU solvers' numba kernels once, into their on-disk cache: ``python -m iis_study.core.solvers.warm``
(``make setup`` runs it after the install). Every kernel is compiled for the types the solvers call it with, so
the first study run or test session after an install loads them (~0.3 s) instead of compiling them (~10 s on
2 cores). A kernel whose source changes later compiles again on first use, as before."""

from __future__ import annotations

import time

import numpy as np

from . import kernels, path_newton


def warm() -> float:
    """Run each kernel family once on a tiny problem; returns the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    n, f, k = 24, 6, 3
    x = rng.standard_normal((n, f)).astype(np.float32)
    labels = np.arange(n) % k
    prob = np.full((k, n), 1.0 / k, np.float32)
    for keep in (None, 1):  # the dense and the sparse (rows' nonzero entries) forms
        xs = x.copy()
        if keep is not None:
            xs[:, keep:] = 0.0
        design = kernels.RowDesign(np.ascontiguousarray(np.hstack([xs, np.ones((n, 1), np.float32)])),
                                   sparse_build=1.0 if keep else 0.0, sparse_products=1.0 if keep else 0.0)
        chol = np.empty((k, f + 1, f + 1), np.float32)
        kernels.class_factors(design, prob, chol, 1.0 / n, 1e-2)
        kernels.conjugate_gradients(design, prob, chol, 1e-2, np.ones((k, f + 1), np.float32), 1e-6, 1e-6, 5)
    a = x.astype(np.float64)
    path_newton.proximal_newton(a, labels, np.zeros((k, f)), np.zeros(k), 1e-3, 1e-5, 1e-8, 5, 0.01, 50, 1, 5)
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"numba kernels compiled and cached in {warm():.1f} s")
