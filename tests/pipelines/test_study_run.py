"""Kedro runs of the study on tiny data (digits, 3 backbones at 32 px, a short sweep)."""

from __future__ import annotations

import json

import pandas as pd

from iis_study.core import features as F
from tests.kedro_project import TINY, run_in_process


def test_registry_namespaces_one_copy_per_backbone(tiny_run):
    from iis_study.pipeline_registry import register_pipelines
    from iis_study.study_config import forget, study_parameters

    forget()
    params = study_parameters(env="test", conf_source=tiny_run / "conf")
    from iis_study import study_config

    study_config.remember(params)
    try:
        pipes = register_pipelines()
    finally:
        forget()
    fe = pipes["feature_extraction"]
    assert sorted(n.name for n in fe.nodes) == sorted(f"{b}.extract_features" for b in TINY["backbones"])
    assert {n.namespace for n in pipes["interpretability"].nodes} == set(TINY["backbones"])
    assert "lite0.sweep_cluster" in pipes["__default__"].all_outputs()
    assert {"iis_scores", "sparsity_curves", "correlation"} <= pipes["reporting"].all_outputs()


def test_outputs_of_the_study(tiny_run):
    rep = tiny_run / "data" / "08_reporting"
    scores = pd.read_csv(rep / "iis_scores.csv")
    assert len(scores) == len(TINY["backbones"]) * len(TINY["concepts"]["types"])
    for col in ["backbone", "concept_type", "accuracy_linear_probe", "iis", "iis_std", "iis_ci_low", "iis_ci_high",
                "iis_chance_corrected"]:
        assert col in scores, col
    grid = TINY["sweep"]["sparsities"]
    span = grid[-1] - grid[0]
    assert scores["iis"].between(0, 1.5 * span).all()
    assert (scores["iis_ci_low"] <= scores["iis_ci_high"]).all()
    assert scores["accuracy_linear_probe"].between(0, 1).all()
    curves = pd.read_csv(rep / "sparsity_curves.csv")
    assert len(curves) == len(scores) * len(grid) * len(TINY["sweep"]["seeds"])
    assert {"backbone", "concept_type", "sparsity", "seed", "accuracy", "arr"} <= set(curves)
    corr = json.loads((rep / "correlation.json").read_text())
    assert set(corr) == set(TINY["concepts"]["types"])
    entry = corr["prototype"]["iis"]
    # the headline correlation is over the pretrained representations (METHOD §6)
    pretrained = [b for b, spec in TINY["backbones"].items() if spec.get("weights") != "random"]
    assert entry["scope"] == "pretrained" and entry["n_backbones"] == len(pretrained)
    assert set(entry) >= {"pearson", "spearman", "kendall"}
    assert set(entry["pearson"]) >= {"r", "p", "ci_low", "ci_high"}
    for b in TINY["backbones"]:
        assert (tiny_run / "data" / "04_feature" / b / "features.safetensors").is_file()
        assert list((tiny_run / "data" / "08_reporting" / b / "concept_gallery.png").iterdir())
    assert list((rep / "iis_vs_accuracy.png").iterdir())
    assert list((rep / "sparsity_curves.png").iterdir())


def test_pretrained_beats_random_control_on_probe(tiny_run):
    scores = pd.read_csv(tiny_run / "data" / "08_reporting" / "iis_scores.csv")
    acc = scores.groupby("backbone")["accuracy_linear_probe"].first()
    assert acc["lite0"] > acc["lite0_random"]


def test_second_extraction_run_does_no_forward_pass(tiny_run):
    before = F.FORWARD_PASSES["count"]
    run_in_process(tiny_run, pipeline="feature_extraction")
    assert F.FORWARD_PASSES["count"] == before


def test_mlflow_parent_and_nested_runs(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("iis_study.level") == "study" and "__default__" in r.info.run_name]
    assert parents, [r.info.run_name for r in runs]
    parent = parents[-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(TINY["backbones"])
    for child in children:
        m = child.data.metrics
        for ctype in TINY["concepts"]["types"]:
            assert f"{ctype}.iis" in m and f"{ctype}.accuracy_linear_probe" in m and f"{ctype}.iis_chance_corrected" in m
        hist = client.get_metric_history(child.info.run_id, "prototype.accuracy")
        assert sorted(h.step for h in hist) == [int(round(s * 100)) for s in TINY["sweep"]["sparsities"]]
        p = child.data.params
        assert p["weights"] in ("offline", "random") and "features.cache_key" in p and p["m"] == "12"
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "tables")}
        assert "tables/iis_scores.csv" in arts
    assert any(a.path == "correlation.json" for a in client.list_artifacts(parent.info.run_id))
