"""Two runs of a study, head by head: which selected heads changed their L2 strength or their test predictions.

    python scripts/compare_selected.py OLD_06_MODELS NEW_06_MODELS

Each argument is a study's ``06_models`` folder (``data/06_models``, ``data/cifar10/06_models``; copy the old one
away before re-running). For every representation and concept type present in both, the sweep's selected heads
(``selected.csv``: the probe and one head per sparsity) and their test correctness (``test_correct.npy``) are
compared: a line per head whose selected C changed or whose correctness differs on any test image, and a total.
Correctness, not the predicted class: a prediction that moves from one wrong class to another is not seen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def compare(old: Path, new: Path) -> tuple[list[str], int, int]:
    """``(lines, heads compared, heads changed)``."""
    lines, n_heads, n_changed = [], 0, 0
    for sweep in sorted(new.glob("*/sweep_*")):
        before = old / sweep.relative_to(new)
        if not (before / "selected.csv").is_file() or not (sweep / "selected.csv").is_file():
            continue
        a, b = pd.read_csv(before / "selected.csv"), pd.read_csv(sweep / "selected.csv")
        ca, cb = np.load(before / "test_correct.npy"), np.load(sweep / "test_correct.npy")
        if len(a) != len(b) or ca.shape != cb.shape:
            lines.append(f"{sweep.parent.name} {sweep.name}: the two runs have different grids; not compared")
            continue
        # test_correct: (seeds, 1 + sparsities, N); selected rows: the probe, then one per sparsity
        for i in range(len(b)):
            n_heads += 1
            head = "probe" if b["head"].iloc[i] == "probe" else f"s={b['sparsity'].iloc[i]:g}"
            flips = int((ca[:, i] != cb[:, i]).sum())
            c_old, c_new = float(a["c"].iloc[i]), float(b["c"].iloc[i])
            if flips or c_old != c_new:
                n_changed += 1
                lines.append(f"{sweep.parent.name} {sweep.name.removeprefix('sweep_')} {head}: C {c_old:g} -> {c_new:g}, "
                             f"{flips} of {ca.shape[-1]} test images change correctness "
                             f"(test accuracy {b['test_acc'].iloc[i] - a['test_acc'].iloc[i]:+.4f})")
    return lines, n_heads, n_changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    for p in (args.old, args.new):
        if not p.is_dir():
            raise SystemExit(f"no folder {p}")
    lines, n, changed = compare(args.old, args.new)
    print("\n".join(lines))
    print(f"{changed} of {n} selected heads changed (C or test correctness)")


if __name__ == "__main__":
    main()
