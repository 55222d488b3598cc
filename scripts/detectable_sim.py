"""The detectable excess against images per class, by simulation (docs/calibration.md, "What a study of this size
can tell").

A study of K classes with ``n`` images per class holds ``0.2 · K · n`` test images (the default split). Its
concepts beat their null by a true excess ``e`` (``iis_study.core.scoring.power.simulated_study``: the probe right 85 % of
the time, the null's heads from 85 % at s = 0 to 45 % at s = 0.98, each set's test noise shared with the probe's
with probability 0.5; one concept draw). Per size, the rule's detectable excess (``core/scoring/power.py``: 2.80 standard
errors of the run's own bootstrap, at two-sided 5 % and 80 % power) is found as the fixed point of runs whose true
excess is that size (root mean square over 40 runs, 3 rounds), then 300 runs at that excess say how often the
interval excludes zero (the rule promises 0.80). The simulation has no classes: K only converts images per class
into test images. A detectable excess beyond the largest the setting holds (``power.max_excess``: the best head at
accuracy 1; a larger one would be clipped and its true excess smaller than stated) is the rule's figure at that
largest excess, marked, and not checked. Writes ``docs/img/detectable_excess.png``; ``--update`` /
``--check`` rewrite or check the table between the ``<!-- detectable -->`` markers.

Usage::

    PYTHONPATH=src python scripts/detectable_sim.py [--update docs/calibration.md | --check docs/calibration.md]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from study_tables import sync_block  # scripts/ is on sys.path when a script runs

import numpy as np
import pandas as pd

from iis_study.core.scoring import calibration as cal
from iis_study.core.scoring import power

ROOT = Path(__file__).resolve().parents[1]
GRID = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
PER_CLASS = (20, 60, 200, 600, 2000)
CLASSES = (3, 10)
TEST_FRACTION = 0.2
N_BOOT = 200


def runs(n_test: int, excess: float, reps: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(reps):
        real, null = power.simulated_study(rng, n_test, excess, GRID)
        out.append(cal.calibrated_scores(real, {"random": null}, GRID, N_BOOT, seed * 10_000 + i, 0.95, power=0.8))
    return out


def detectable_size(n_test: int, reps: int = 40, rounds: int = 3) -> tuple[float, bool]:
    """The rule's detectable excess of a study whose true excess is that size (the spread depends on it), and
    whether it lies beyond the largest excess the simulated setting holds (``power.max_excess``): then the
    iteration stops there and the figure is the rule's at that largest excess, which cannot be checked."""
    room = power.max_excess(GRID)
    e, mde = 0.0, 0.0
    for r in range(rounds):
        mdes = [x["iis_excess_random_detectable"] for x in runs(n_test, e, reps, 100 + r)]
        mde = float(np.sqrt(np.mean(np.square(mdes))))
        e = min(mde, room)
    return mde, mde > room


def table(reps: int) -> pd.DataFrame:
    rows = []
    for k in CLASSES:
        for n in PER_CLASS:
            n_test = int(round(TEST_FRACTION * k * n))
            size, beyond = detectable_size(n_test)
            detected = (math.nan if beyond else
                        float(np.mean([x["iis_excess_random_ci_low"] > 0 for x in runs(n_test, size, reps, 1)])))
            rows.append({"classes": k, "images per class": n, "test images": n_test, "detectable excess": size,
                         "beyond": beyond, "detected": detected})
    return pd.DataFrame(rows)


def markdown(rows: pd.DataFrame, reps: int) -> str:
    room = power.max_excess(GRID)
    lines = ["| images per class | " + " | ".join(f"K = {k}: test images, detectable excess, detected" for k in CLASSES) + " |",
             "|---|" + "---|" * len(CLASSES)]
    for n in PER_CLASS:
        cells = []
        for k in CLASSES:
            r = rows[(rows["classes"] == k) & (rows["images per class"] == n)].iloc[0]
            if r["beyond"]:
                cells.append(f"{int(r['test images'])}, {r['detectable excess']:.3f}†, —")
            else:
                cells.append(f"{int(r['test images'])}, {r['detectable excess']:.3f}, {r['detected']:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n(The simulation has no classes: K only converts images per class into test images, "
        f"{TEST_FRACTION:.0%} of K × n. detected: the share of {reps} simulated studies at that excess whose interval "
        f"excludes 0; the rule promises 0.80. †: larger than any excess the simulated setting holds ({room:.3f}, where "
        f"its best head reaches accuracy 1): the rule's figure at that largest excess, itself beyond it, so such a "
        f"study's detectable excess lies outside what this setting can simulate and is not checked.)")


def figure(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = rows.assign(classes=[f"K = {k}" for k in rows["classes"]])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=data, x="images per class", y="detectable excess", hue="classes", marker="o", ax=ax)
    room = power.max_excess(GRID)
    ax.axhline(room, color="0.3", lw=0.8, ls="--")
    ax.annotate("largest excess the simulation holds", (PER_CLASS[-1], room), ha="right", va="bottom", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="images per class (20 % of them test images)",
           ylabel="detectable excess (IIS)", title="Smallest excess over a null a study detects\n(two-sided 5 %, power 80 %, one concept draw)")
    for y in (0.05, 0.1):
        ax.axhline(y, color="0.6", lw=0.8, ls=":")
    ticks = [0.02, 0.05, 0.1, 0.2, 0.5]
    ax.set_yticks(ticks, [f"{y:g}" for y in ticks])
    ax.set_yticks([], minor=True)
    ax.set_xticks(list(PER_CLASS), [str(n) for n in PER_CLASS])
    ax.set_xticks([], minor=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--update", metavar="FILE")
    parser.add_argument("--check", metavar="FILE")
    args = parser.parse_args()
    rows = table(args.reps)
    text = markdown(rows, args.reps)
    print(text)
    if args.check:
        sync_block(Path(args.check), "detectable", text, update=False)
        return
    figure(rows, ROOT / "docs" / "img" / "detectable_excess.png")
    if args.update:
        sync_block(Path(args.update), "detectable", text, update=True)


if __name__ == "__main__":
    main()
