"""Two runs of a study, head by head: which selected heads changed their L2 strength or their test predictions.

    python scripts/compare_selected.py OLD_06_MODELS NEW_06_MODELS

Each argument is a study's ``06_models`` folder (``data/06_models``, ``data/cifar10/06_models``; copy the old one
away before re-running). For every representation and concept type present in both, the sweep's selected heads
(``selected.csv``: the probe and one head per sparsity) and their test correctness (``test_correct.npy``) are
compared: a line per head whose selected C changed or whose correctness differs on any test image, and a total.
Correctness, not the predicted class: a prediction that moves from one wrong class to another is not seen. Only
draw 0's heads (the sweep folders): the other concept draws and the nulls are not compared. Sweeps present in one
run only, Adam sweeps (no L2 strength) and sweeps of different grids are named and skipped; no sweep in common is
an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def _sweeps(root: Path) -> set[Path]:
    return {p.parent.relative_to(root) for p in root.glob("*/sweep_*/selected.csv")}


def compare(old: Path, new: Path) -> tuple[list[str], int, int]:
    """``(lines, heads compared, heads changed)``: draw 0's selected heads (the sweep folders; the other concept
    draws and the nulls, in ``draws_<type>.safetensors``, are not compared)."""
    lines, n_heads, n_changed = [], 0, 0
    only = sorted(_sweeps(old) ^ _sweeps(new))
    lines += [f"{p}: only in {'the old' if (old / p).is_dir() else 'the new'} run; not compared" for p in only]
    for rel in sorted(_sweeps(old) & _sweeps(new)):
        before, sweep = old / rel, new / rel
        a, b = pd.read_csv(before / "selected.csv"), pd.read_csv(sweep / "selected.csv")
        if "c" not in a or "c" not in b:
            lines.append(f"{rel}: not a convex sweep (no L2 strength column c); not compared")
            continue
        if not (before / "test_correct.npy").is_file() or not (sweep / "test_correct.npy").is_file():
            lines.append(f"{rel}: test_correct.npy missing; not compared")
            continue
        ca, cb = np.load(before / "test_correct.npy"), np.load(sweep / "test_correct.npy")
        same_grid = (len(a) == len(b) and a["head"].tolist() == b["head"].tolist()
                     and np.allclose(a["sparsity"].to_numpy(float), b["sparsity"].to_numpy(float), equal_nan=True))
        if not same_grid or ca.shape != cb.shape or ca.shape[1] != len(b):
            lines.append(f"{rel}: the two runs have different grids; not compared")
            continue
        # test_correct: (seeds, 1 + sparsities, N); selected rows: the probe, then one per sparsity
        for i in range(len(b)):
            n_heads += 1
            head = "probe" if b["head"].iloc[i] == "probe" else f"s={b['sparsity'].iloc[i]:g}"
            flips = int((ca[:, i] != cb[:, i]).sum())
            c_old, c_new = float(a["c"].iloc[i]), float(b["c"].iloc[i])
            if flips or c_old != c_new:
                n_changed += 1
                lines.append(f"{rel.parent} {rel.name.removeprefix('sweep_')} {head}: C {c_old:g} -> {c_new:g}, "
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
    if n == 0:
        raise SystemExit(f"no sweep found in both {args.old} and {args.new} (give the studies' 06_models folders)")
    print(f"{changed} of {n} selected heads changed (C or test correctness; draw 0's heads)")


if __name__ == "__main__":
    main()
