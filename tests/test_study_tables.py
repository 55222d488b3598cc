"""``scripts/study_tables.py --check`` fails on a docs table that does not match the run, and passes after
``--update``; a correlation on fewer than 5 units prints no interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "study_tables.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def _project(tmp_path: Path) -> Path:
    rep = tmp_path / "data" / "08_reporting"
    rep.mkdir(parents=True)
    rows = []
    for i, name in enumerate(["a", "b", "c"]):
        rows.append({
            "backbone": name, "representation": name, "concept_type": "prototype", "accuracy_linear_probe": 0.8 + 0.05 * i,
            "accuracy_linear_probe_std": None, "iis": 0.7 + 0.01 * i, "iis_ci_low": 0.65, "iis_ci_high": 0.75,
            "iis_chance_corrected": 0.6, "estimator": "convex", "certified": True, "max_grad": 1e-6, "iterations": 100,
            "heads_converged": True, "n_draws": 3, "iis_sd_test": 0.02, "iis_sd_draw": 0.01, "iis_share_draw": 0.1,
            "iis_null_random": 0.75, "iis_excess_random": -0.05 + 0.01 * i, "iis_excess_random_ci_low": -0.08,
            "iis_excess_random_ci_high": -0.01, "anec_5": 0.6, "anec_avg": 0.7 + 0.01 * i, "anec_avg_sd_draw": 0.02,
            "anec_5_null_random": 0.5, "anec_avg_null_random": 0.66, "anec_avg_excess_random": 0.04 + 0.01 * i,
            "anec_certified": i != 2,
        })
    pd.DataFrame(rows).to_csv(rep / "iis_scores.csv", index=False)
    entry = {m: {"r": 0.5, "p": 0.2, "p_perm": 0.33, "ci_low": None, "ci_high": None} for m in ("pearson", "spearman", "kendall")}
    scopes = {"groups": [{"scope": "all", "group": "all", "n_representations": 3, "representations": ["a", "b", "c"],
                          "correlation": {"prototype": {"iis": {**entry, "interval": "too few representations"}}},
                          "ranking_stability": {}}]}
    (rep / "correlation_scopes.json").write_text(json.dumps(scopes))
    return tmp_path


def test_check_fails_on_a_stale_table_and_passes_after_update(tmp_path):
    project = _project(tmp_path)
    doc = tmp_path / "doc.md"
    blocks = "".join(f"<!-- study_tables:x-{k} -->\n| stale |\n<!-- /study_tables:x-{k} -->\n"
                     for k in ("representations", "correlations", "nulls", "anec"))
    doc.write_text("# page\n" + blocks)
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 1
    assert _run(str(project), "--update", str(doc), "--prefix", "x").returncode == 0
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 0
    text = doc.read_text()
    assert "too few representations" in text and "p_perm 0.330" in text
    assert "| +0.50, p_perm 0.330 |" in text  # no interval on 3 representations
    assert "-0.030" in text  # an excess from the nulls block
    assert "| c | prototype | 0.900 | 0.720 | -0.030 | 0.600 | 0.720 ± 0.020 | 0.660, +0.060 | **no** |" in text
    # one changed number in the run makes the page stale again
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv")
    scores.loc[0, "iis_null_random"] = 0.5
    scores.to_csv(project / "data" / "08_reporting" / "iis_scores.csv", index=False)
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 1


def test_the_specification_verdict_block_is_written_from_the_run_and_checked(tmp_path):
    from iis_study.core.reporting.report import specification_curve
    from tests.core.test_specification import PARAMS, SWEEP, _study

    project = _project(tmp_path)
    iis_scores, tables = _study(keep_wide_slope=-0.6)
    _, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    rep = project / "data" / "08_reporting"
    (rep / "specification_curve.json").write_text(json.dumps(record))
    doc = tmp_path / "doc.md"
    doc.write_text("# page\n" + "".join(f"<!-- study_tables:x-{k} -->\n| stale |\n<!-- /study_tables:x-{k} -->\n"
                                        for k in ("specification", "verdict")))
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 1
    assert _run(str(project), "--update", str(doc), "--prefix", "x").returncode == 0
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 0
    text = doc.read_text()
    assert "- prototype (pretrained, 6 representations): **sign not identified across reasonable formulations" in text
    assert "the sign is set by head_grid" in text and "| prototype | above_chance | 6 |" in text
    record["verdicts"][1]["verdict"] = "sign robust (48 of 48 specifications agree, r > 0)"  # the run changed
    (rep / "specification_curve.json").write_text(json.dumps(record))
    assert _run(str(project), "--check", str(doc), "--prefix", "x").returncode == 1
