"""The correlation node on hand-made scores, and what a second run keeps."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pandas as pd

from iis_study.pipelines.reporting.nodes import correlate_scores
from tests.kedro_project import run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs

PARAMS = {"scores": ["iis", "iis_chance_corrected"], "n_boot": 200, "seed": 0, "ci": 0.95}


def _all_scope(out):
    """correlation over all representations (the node may also return its per-scope records)."""
    return out[0] if isinstance(out, tuple) else out


def _scores(acc, iis):
    return pd.DataFrame(
        {
            "backbone": [f"b{i}" for i in range(len(acc))],
            "concept_type": "prototype",
            "model": "tf_efficientnet_lite0",
            "weights": "offline",
            "accuracy_linear_probe": acc,
            "iis": iis,
            "iis_chance_corrected": np.asarray(iis) - 0.1,
        }
    )


def test_perfectly_monotone_scores_give_rank_correlation_one():
    acc = [0.5, 0.6, 0.7, 0.8, 0.9]
    out = _all_scope(correlate_scores(_scores(acc, [0.10, 0.11, 0.30, 0.31, 0.90]), PARAMS))  # monotone, not linear
    e = out["prototype"]["iis"]
    assert e["spearman"]["r"] == pytest.approx(1.0) and e["kendall"]["r"] == pytest.approx(1.0)
    assert 0.5 < e["pearson"]["r"] < 1.0
    assert e["n_backbones"] == 5
    assert e["spearman"]["ci_low"] <= e["spearman"]["r"] + 1e-9 and e["spearman"]["r"] <= e["spearman"]["ci_high"] + 1e-9
    assert out["prototype"]["iis_chance_corrected"]["spearman"]["r"] == pytest.approx(1.0)


def test_two_backbones_give_null_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        out = _all_scope(correlate_scores(_scores([0.5, 0.9], [0.2, 0.4]), PARAMS))
    e = out["prototype"]["iis"]
    assert e["pearson"]["r"] is None and e["spearman"]["p"] is None and e["kendall"]["ci_low"] is None
    assert e["n_backbones"] == 2
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_second_run_adds_a_parent_run_and_keeps_earlier_plots(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")

    def parents():
        return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("iis_study.level") == "study"]

    before = len(parents())
    plot_dir = tiny_run / "data" / "08_reporting" / "iis_vs_accuracy.png"
    versions = sorted(p.name for p in plot_dir.iterdir())
    run_in_process(tiny_run, pipeline="reporting")
    assert len(parents()) == before + 1
    after = sorted(p.name for p in plot_dir.iterdir())
    assert set(versions) < set(after)  # the earlier versions are all still there
