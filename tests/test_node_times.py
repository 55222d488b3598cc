"""``scripts/node_times.py`` reads a run's node times from Kedro's log file: the last run only, each node from
its "Running" to its "Completed" line, grouped by the node's function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "node_times.py"

_LOG = """\
2026-12-07 01:00:00,000 - kedro.framework.session.session - INFO - Kedro project iis_study
2026-12-07 01:00:01,000 - kedro.pipeline.node - INFO - Running node: train_interpreters: train_interpreters([a]) -> [b]
2026-12-07 01:09:00,000 - kedro.runner.sequential_runner - INFO - Completed node: old.train_interpreters
2026-12-07 02:00:00,000 - kedro.framework.session.session - INFO - Kedro project iis_study
2026-12-07 02:00:02,000 - kedro.pipeline.node - INFO - Running node: make_splits: make_splits([images]) -> [splits]
2026-12-07 02:00:03,500 - kedro.runner.sequential_runner - INFO - Completed node: make_splits
2026-12-07 02:00:03,600 - kedro.pipeline.node - INFO - Running node: train_interpreters: train_interpreters([a]) -> [b]
2026-12-07 02:00:03,700 - iis_study.core.heads.convex - INFO - convex heads: a message between the two lines
2026-12-07 02:01:13,600 - kedro.runner.sequential_runner - INFO - Completed node: lite0.train_interpreters
2026-12-07 02:01:13,700 - kedro.pipeline.node - INFO - Running node: train_interpreters: train_interpreters([a]) -> [b]
2026-12-07 02:01:43,700 - kedro.runner.sequential_runner - INFO - Completed node: lite1.train_interpreters
"""


def test_node_times_of_the_last_run_by_node_kind(tmp_path):
    log = tmp_path / "info.log"
    log.write_text(_LOG)
    out = subprocess.run([sys.executable, str(SCRIPT), str(log), "--top", "2"], capture_output=True, text=True,
                         check=True).stdout
    assert "3 nodes, 102 s in nodes, 104 s wall" in out  # 1.5 + 70 + 30; 02:00:00 -> 02:01:43.7
    assert "| train_interpreters | 2 | 100 s | 99% | 70.0 s |" in out  # the earlier run's 9 minutes are not counted
    assert "| make_splits | 1 | 2 s | 1% | 1.5 s |" in out
    assert out.index("lite0.train_interpreters") < out.index("lite1.train_interpreters")
    assert "make_splits\n" not in out.split("slowest 2 nodes:")[1]
