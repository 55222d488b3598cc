"""Kedro runs of the study on tiny data (digits, 3 backbones at 32 px, a short sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iis_study.core.representations import features as F
from tests.kedro_project import TINY, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def test_registry_namespaces_one_copy_per_backbone(tiny_run):
    from iis_study.pipeline_registry import register_pipelines
    from tests.kedro_project import chdir, kedro_env

    with chdir(tiny_run), kedro_env("test"):  # the registry reads the env itself, every call
        pipes = register_pipelines()
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
    # the estimator: convex (certified) for the fixed concepts, adam for the learned end-to-end ones
    assert set(scores["estimator"]) == {"convex", "adam"}
    convex = scores[scores["estimator"] == "convex"]
    assert set(convex["concept_type"]) == {"prototype", "cluster"} and convex["certified"].astype(bool).all()
    assert (convex["n_seeds"] == 1).all() and (convex["max_grad"] <= 1e-5).all()
    # every prototype / cluster score: 3 concept draws and the three nulls beside it (conf/base's defaults)
    assert (convex["n_draws"] == 3).all() and convex["draws_certified"].astype(bool).all()
    for kind in ("random", "rotated", "gaussian"):
        assert convex[f"iis_null_{kind}"].notna().all(), kind
        assert np.allclose(convex[f"iis_excess_{kind}"], convex["iis"] - convex[f"iis_null_{kind}"])
        assert (convex[f"iis_excess_{kind}_ci_low"] <= convex[f"iis_excess_{kind}_ci_high"]).all()
    assert np.allclose(convex["iis"], convex[["iis_draw0", "iis_draw1", "iis_draw2"]].mean(1))
    assert scores.loc[scores["estimator"] == "adam", "iis_null_random"].isna().all()  # end-to-end: no nulls
    assert list((rep / "iis_nulls.png").iterdir())
    # the budget and counts are integers in the table (4000, not 4000.0), where a row has them
    raw = pd.read_csv(rep / "iis_scores.csv", dtype=str)
    for col in ["steps", "batch_size", "epochs", "n_seeds", "n_rising", "n_heads", "iterations"]:
        values = raw[col].dropna()
        assert len(values) and values.str.fullmatch(r"\d+").all(), (col, values.tolist())
    curves = pd.read_csv(rep / "sparsity_curves.csv")
    sets = (1 + 3) * 3  # convex: 3 concept draws and 3 nulls of 3 draws each; adam: one draw, its seeds
    assert len(curves) == len(grid) * (sets * len(convex) + int(scores.loc[scores["estimator"] == "adam", "n_seeds"].sum()))
    assert {"backbone", "concept_type", "concept_set", "draw", "sparsity", "seed", "accuracy", "arr"} <= set(curves)
    # the curves add up to the scores: integrated and averaged over draws, each set gives its IIS to 1e-9
    from iis_study.core.reporting.report import integrated_curves

    areas = integrated_curves(curves).pivot(index=["backbone", "concept_type"], columns="concept_set", values="iis")
    table = scores.set_index(["backbone", "concept_type"])
    assert (areas["concepts"] - table["iis"]).abs().max() < 1e-9
    for kind in ("random", "rotated", "gaussian"):
        assert (areas[f"null_{kind}"] - table[f"iis_null_{kind}"]).dropna().abs().max() < 1e-9
    # the specification curve: every specification per concept type and scope, its verdict, the headline reproduced
    spec = pd.read_csv(rep / "specification_curve.csv")
    record = json.loads((rep / "specification_curve.json").read_text())
    assert set(spec["concept_type"]) == {"prototype", "cluster"}  # end-to-end (adam): no grid to re-select
    assert record["reproduces_study"] < 1e-9 and record["headline_scope"] == "pretrained"
    assert set(record["headline_verdict"]) == {"prototype", "cluster"}
    assert all(v.startswith("too few representations (2 < 5") for v in record["headline_verdict"].values())  # 2 pretrained
    assert record["grid_notes"] == [] and json.dumps(record, allow_nan=False)  # strict JSON
    assert list((rep / "specification_curve.png").iterdir())
    corr = json.loads((rep / "correlation.json").read_text())
    assert set(corr) == set(TINY["concepts"]["types"])
    entry = corr["prototype"]["iis"]
    # the headline correlation is over the pretrained representations (METHOD §6)
    pretrained = [b for b, spec in TINY["backbones"].items() if spec.get("weights") != "random"]
    assert entry["scope"] == "pretrained" and entry["n_backbones"] == len(pretrained)
    assert set(entry) >= {"pearson", "spearman", "kendall"}
    assert set(entry["pearson"]) >= {"r", "p", "p_perm", "ci_low", "ci_high"}
    assert entry["interval"] == "too few representations" and entry["pearson"]["ci_low"] is None  # 2 pretrained
    for b in TINY["backbones"]:
        assert (tiny_run / "data" / "04_feature" / b / "features.safetensors").is_file()
        assert list((tiny_run / "data" / "08_reporting" / b / "concept_gallery.png").iterdir())
    assert list((rep / "iis_vs_accuracy.png").iterdir())
    assert list((rep / "sparsity_curves.png").iterdir())
    # one figure per correlation scope (versioned folder of <scope>.png)
    version = sorted((rep / "iis_vs_accuracy_scopes").iterdir())[-1]  # other tests may run the reporting again
    scopes = json.loads((rep / "correlation_scopes.json").read_text())["groups"]
    assert len(scopes) >= 2 and sorted(p.name for p in (version / "iis_vs_accuracy_scopes").iterdir()) == sorted(
        f"{g['scope'] if g['group'] == g['scope'] else g['scope'] + '_' + g['group']}.png" for g in scopes)


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
    parents = [r for r in runs if r.data.tags.get("iis_study.level") == "study" and " · study · " in r.info.run_name]
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
    # the specification curve's verdict beside the headline: the record, the table and a tag per concept type
    assert any(a.path == "specification_curve.json" for a in client.list_artifacts(parent.info.run_id))
    for ctype in ("prototype", "cluster"):
        assert parent.data.tags[f"specification.{ctype}"].startswith(f"{ctype} (pretrained, 2 representations): ")


def _study_runs(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("iis_study.level") == "study" and " · study · " in r.info.run_name][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_mlflow_metrics_equal_the_csv_results(tiny_run):
    """Every nested run's scores and A(s) curve are the numbers of iis_scores.csv / sparsity_curves.csv."""
    client, _, children = _study_runs(tiny_run)
    scores = pd.read_csv(tiny_run / "data" / "08_reporting" / "iis_scores.csv")
    curves = pd.read_csv(tiny_run / "data" / "08_reporting" / "sparsity_curves.csv")
    checked = 0
    for child in children:
        bb = child.data.tags["backbone"]
        for ctype in TINY["concepts"]["types"]:
            row = scores[(scores["backbone"] == bb) & (scores["concept_type"] == ctype)].iloc[0]
            keys = ["iis", "iis_chance_corrected", "accuracy_linear_probe"]
            keys += [k for k in ("iis_null_random", "iis_excess_random", "iis_excess_random_ci_low") if pd.notna(row.get(k))]
            for key in keys:
                assert child.data.metrics[f"{ctype}.{key}"] == pytest.approx(row[key], rel=1e-12, abs=1e-12, nan_ok=True), (
                    bb, ctype, key)
            curve = curves[(curves["backbone"] == bb) & (curves["concept_type"] == ctype)
                           & (curves["concept_set"] == "concepts")]  # the concept draws' mean curve, not the nulls'
            expected = {int(round(100 * s)): a for s, a in curve.groupby("sparsity")["accuracy"].mean().items()}
            logged = {h.step: h.value for h in client.get_metric_history(child.info.run_id, f"{ctype}.accuracy")}
            assert logged.keys() == expected.keys()
            for step, value in expected.items():
                assert logged[step] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), (bb, ctype, step)
            checked += 1
    assert checked == len(TINY["backbones"]) * len(TINY["concepts"]["types"])


def test_mlflow_runs_carry_their_lineage(tiny_run):
    """Commit, source, resolved parameters and the dataset on the parent and every nested run."""
    import subprocess

    import yaml
    from mlflow.artifacts import download_artifacts

    client, parent, children = _study_runs(tiny_run)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags.get("iis_study.git.dirty") in ("true", "false")
        assert tags.get("mlflow.source.git.commit") == head  # the tiny project is a copy: the code's repository
        assert tags.get("mlflow.source.name") and tags.get("mlflow.user")
        params = yaml.safe_load(Path(download_artifacts(run_id=run.info.run_id, artifact_path="params.yml",
                                                        tracking_uri=client._tracking_client.tracking_uri)).read_text())
        assert params["sweep"]["sparsities"] == TINY["sweep"]["sparsities"]
        assert run.data.params["params.concepts.m"] == "12"
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].dataset.name.startswith("digits@")
        assert len(inputs[0].dataset.digest) >= 16
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in [parent, *children]}
    assert len(digests) == 1  # one image set behind every representation
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/iis_scores.json", "tables/iis_scores.csv"} <= tables


def test_val_and_test_are_wired_to_their_own_splits(tiny_run):
    """From the split table to the sweep: features are those of the table's images, and the stored
    probe's accuracy on the *test* rows is the reported test accuracy (on the val rows, the val
    accuracy). A swap of val and test anywhere in between changes one of these numbers."""
    import numpy as np
    import torch

    from iis_study.core.representations.backbones import build
    from iis_study.core.data import DatasetParams, load_dataset
    from iis_study.core.representations.features import extract
    from iis_study.datasets import SweepResultDataset, TensorDictDataset

    data = tiny_run / "data"
    splits = pd.read_csv(data / "02_intermediate" / "splits.csv")
    feats = TensorDictDataset(filepath=str(data / "04_feature" / "lite0" / "features.safetensors")).load()
    for name in ("train", "val", "test"):
        rows = splits[splits["split"] == name]
        assert feats[f"{name}.index"].tolist() == rows["index"].tolist(), name
        assert feats[f"{name}.y"].tolist() == rows["label"].tolist(), name
    # the features of the first test images are the backbone's features of exactly those images
    images = load_dataset(DatasetParams.from_params(TINY["dataset"]))
    rep = build(TINY["backbones"]["lite0"], name="lite0")
    first = feats["test.index"][:4].numpy()
    direct = extract(rep, images.subset(first), batch_size=4, num_workers=0, progress=False).x
    torch.testing.assert_close(direct, feats["test.x"][:4], rtol=1e-4, atol=1e-5)

    result = SweepResultDataset(filepath=str(data / "06_models" / "lite0" / "sweep_prototype")).load()
    probes = result.selected[result.selected["head"] == "probe"].sort_values("seed")
    w, b = result.state["probe.weight"].double(), result.state["probe.bias"].double()
    differs = 0
    for i, row in enumerate(probes.itertuples()):
        acc = {s: float(((feats[f"{s}.x"].double() @ w[i].T + b[i]).argmax(1) == feats[f"{s}.y"]).double().mean())
               for s in ("val", "test")}
        assert acc["test"] == pytest.approx(row.test_acc, abs=1e-9), (row.seed, acc, row.test_acc)
        assert acc["val"] == pytest.approx(row.val_acc, abs=1e-9), (row.seed, acc, row.val_acc)
        differs += acc["val"] != acc["test"]
    assert differs, "precondition: val and test accuracies must differ for a swap to show"
    assert np.isclose(pd.read_csv(data / "08_reporting" / "iis_scores.csv").query(
        "backbone == 'lite0' and concept_type == 'prototype'")["accuracy_linear_probe"].item(),
        probes["test_acc"].mean(), atol=1e-12)
