"""``scripts/compare_selected.py`` lists each selected head whose L2 strength or test correctness changed between
two runs, and counts the rest as unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_selected.py"


def _sweep(root: Path, c: list[float], correct: np.ndarray, acc: list[float]) -> None:
    folder = root / "lite0" / "sweep_prototype"
    folder.mkdir(parents=True)
    pd.DataFrame({"head": ["probe", "interp", "interp"], "seed": 0, "sparsity": [np.nan, 0.0, 0.9], "c": c,
                  "val_acc": 0.5, "test_acc": acc}).to_csv(folder / "selected.csv", index=False)
    np.save(folder / "test_correct.npy", correct)


def test_changed_heads_are_listed_and_counted(tmp_path):
    correct = np.zeros((1, 3, 10), dtype=bool)
    correct[0, :, :5] = True
    changed = correct.copy()
    changed[0, 2, 7] = True  # one test image more right at s = 0.9
    _sweep(tmp_path / "old", [1.0, 10.0, 10.0], correct, [0.5, 0.5, 0.5])
    _sweep(tmp_path / "new", [1.0, 100.0, 10.0], changed, [0.5, 0.5, 0.6])
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "old"), str(tmp_path / "new")],
                         capture_output=True, text=True, check=True).stdout
    assert "lite0 prototype s=0: C 10 -> 100, 0 of 10 test images change correctness" in out
    assert "lite0 prototype s=0.9: C 10 -> 10, 1 of 10 test images change correctness (test accuracy +0.1000)" in out
    assert "probe:" not in out  # the unchanged probe is not listed
    assert out.strip().endswith("2 of 3 selected heads changed (C or test correctness)")
