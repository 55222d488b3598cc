"""Simulated coverage of the two-level interval against a plain nested bootstrap (docs/calibration.md).

R = 3 concept draws; the head at sparsity j of draw r is right on a test image when a uniform draw falls below
its accuracy ``base_j + δ_r`` (``δ_r ~ N(0, sd)``: the concept draw); the uniform of an image is shared by every
head and draw with probability ρ (correlated test noise). 400 test images, 300 test-image resamples. The
population value is the IIS of the mean accuracies. Prints the coverage of both 95 % intervals per setting;
``--update`` / ``--check`` rewrite or check the table between the ``<!-- coverage -->`` markers.

Usage::

    PYTHONPATH=src python scripts/coverage_sim.py [--reps 400] [--update docs/calibration.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from study_tables import sync_block  # scripts/ is on sys.path when a script runs

import numpy as np

from iis_study.core.scoring import calibration as cal

S = np.array([0.0, 0.3, 0.6, 0.9])
BASE = np.array([0.8, 0.7, 0.55, 0.4])
PROBE = 0.9
SETTINGS = ((0.0, 0.8), (0.0, 0.3), (0.02, 0.7), (0.04, 0.5), (0.08, 0.7))


def simulate(rng: np.random.Generator, r: int, n: int, sd: float, rho: float) -> list[np.ndarray]:
    shared = rng.random(n)
    delta = rng.normal(0.0, sd, size=r)
    out = []
    for d in range(r):
        u = np.where(rng.random(n) < rho, shared, rng.random(n))
        p = np.concatenate([[PROBE], BASE + delta[d]])
        out.append((u[None, :] < p[:, None])[None])
    return out


def coverage(sd: float, rho: float, reps: int, seed: int = 0) -> tuple[float, float]:
    truth = float(cal.iis_along_last(S, BASE / PROBE))
    rng = np.random.default_rng(seed)
    ours = nested = 0
    for i in range(reps):
        draws = simulate(rng, 3, 400, sd, rho)
        point = np.array([cal.set_iis(c, S) for c in draws])
        boot = cal.boot_iis_sets(draws, S, 300, np.random.default_rng(i))
        iv = cal.two_level(point, boot, 0.95)
        ours += iv["ci_low"] <= truth <= iv["ci_high"]
        pick = np.random.default_rng(i + 1).integers(0, 3, size=(300, 3))
        lo, hi = np.percentile(np.take_along_axis(boot, pick, axis=1).mean(1), [2.5, 97.5])
        nested += lo <= truth <= hi
    return ours / reps, nested / reps


def table(reps: int) -> str:
    lines = ["| draw sd of accuracy | ρ (shared test noise) | this interval | plain nested bootstrap |", "|---|---|---|---|"]
    for sd, rho in SETTINGS:
        ours, nested = coverage(sd, rho, reps)
        lines.append(f"| {sd:g} | {rho:g} | {ours:.3f} | {nested:.3f} |")
    return "\n".join(lines) + f"\n\n({reps} repetitions per setting.)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--update", metavar="FILE")
    parser.add_argument("--check", metavar="FILE")
    args = parser.parse_args()
    text = table(args.reps)
    print(text)
    target = args.update or args.check
    if not target:
        return
    sync_block(Path(target), "coverage", text, update=bool(args.update))

if __name__ == "__main__":
    main()
