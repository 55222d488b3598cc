"""``scripts/compare_selected.py`` lists each selected head whose L2 strength or test correctness changed between
two runs, and counts the rest as unchanged."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_selected.py"


def _run(monkeypatch, capsys, *args: str) -> tuple[str, BaseException | None]:
    """The script's ``main`` in this process (no interpreter start-up): its stdout and the exit it raised."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    raised = None
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as exc:
        raised = exc
    return capsys.readouterr().out, raised


def _sweep(root: Path, c: list[float], correct: np.ndarray, acc: list[float]) -> None:
    folder = root / "lite0" / "sweep_prototype"
    folder.mkdir(parents=True)
    pd.DataFrame({"head": ["probe", "interp", "interp"], "seed": 0, "sparsity": [np.nan, 0.0, 0.9], "c": c,
                  "val_acc": 0.5, "test_acc": acc}).to_csv(folder / "selected.csv", index=False)
    np.save(folder / "test_correct.npy", correct)


def test_changed_heads_are_listed_and_counted(tmp_path, monkeypatch, capsys):
    correct = np.zeros((1, 3, 10), dtype=bool)
    correct[0, :, :5] = True
    changed = correct.copy()
    changed[0, 2, 7] = True  # one test image more right at s = 0.9
    _sweep(tmp_path / "old", [1.0, 10.0, 10.0], correct, [0.5, 0.5, 0.5])
    _sweep(tmp_path / "new", [1.0, 100.0, 10.0], changed, [0.5, 0.5, 0.6])
    out, raised = _run(monkeypatch, capsys, str(tmp_path / "old"), str(tmp_path / "new"))
    assert raised is None
    assert "lite0 prototype s=0: C 10 -> 100, 0 of 10 test images change correctness" in out
    assert "lite0 prototype s=0.9: C 10 -> 10, 1 of 10 test images change correctness (test accuracy +0.1000)" in out
    assert "probe:" not in out  # the unchanged probe is not listed
    assert out.strip().endswith("2 of 3 selected heads changed (C or test correctness; draw 0's heads)")


def test_other_grids_and_missing_sweeps_are_named_and_nothing_in_common_fails(tmp_path, monkeypatch, capsys):
    correct = np.zeros((1, 3, 10), dtype=bool)
    _sweep(tmp_path / "old", [1.0, 10.0, 10.0], correct, [0.5, 0.5, 0.5])
    _sweep(tmp_path / "new", [1.0, 10.0, 10.0], correct, [0.5, 0.5, 0.5])
    sel = tmp_path / "new" / "lite0" / "sweep_prototype" / "selected.csv"
    table = pd.read_csv(sel)
    table.loc[2, "sparsity"] = 0.5  # same length, another grid
    table.to_csv(sel, index=False)
    (tmp_path / "new" / "lite1" / "sweep_cluster").mkdir(parents=True)
    table.to_csv(tmp_path / "new" / "lite1" / "sweep_cluster" / "selected.csv", index=False)
    out, raised = _run(monkeypatch, capsys, str(tmp_path / "old"), str(tmp_path / "new"))
    assert "lite0/sweep_prototype: the two runs have different grids; not compared" in out
    assert "lite1/sweep_cluster: only in the new run; not compared" in out
    assert isinstance(raised, SystemExit) and "no sweep found in both" in str(raised.code)
