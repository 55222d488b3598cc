"""The adam estimator's convergence test on simulated training: how often it flags (issue 22).

``core.scoring.convergence.budget_check`` flags a score when the IIS at the full budget and at half of it
differ beyond ±0.01 for the whole of their paired bootstrap interval over test images. This script
simulates sweeps (:func:`~iis_study.core.scoring.convergence.simulate_budget_flags`: 3 seeds x 3 learning
rates x the probe and 8 sparsities, 250 epochs, 359 val and 359 test images, val curves that
fluctuate by 1-2 points from epoch to epoch) with no trend at all, and with the heads still rising,
and prints the share of sweeps flagged: the false-flag rate and the power.

Usage::

    PYTHONPATH=src python scripts/budget_flag_rate.py            # 400 trend-free sweeps, 100 per trend
"""

from __future__ import annotations

import argparse

from iis_study.core.scoring.convergence import simulate_budget_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--null", type=int, default=400, help="trend-free sweeps")
    ap.add_argument("--rising", type=int, default=100, help="sweeps per rising trend")
    args = ap.parse_args()
    flat = simulate_budget_flags(args.null, trend=0.0, seed=10)
    print(f"no trend: {(~flat).sum()} of {flat.size} sweeps flagged ({100 * (~flat).mean():.1f} %)")
    for trend in (0.1, 0.2, 0.3):
        rising = simulate_budget_flags(args.rising, trend=trend, seed=int(100 * trend))
        print(f"heads rising (borderline images +{trend:.1f} over training): "
              f"{(~rising).sum()} of {rising.size} flagged ({100 * (~rising).mean():.0f} %)")


if __name__ == "__main__":
    main()
