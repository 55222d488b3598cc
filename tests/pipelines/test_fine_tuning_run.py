"""The fine-tuning pipeline on tiny data: both arms, IIS along training, MLflow runs."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.kedro_project import TINY, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def test_fine_tuning_pipeline(tiny_run):
    run_in_process(tiny_run, pipeline="fine_tuning")
    table = pd.read_csv(tiny_run / "data" / "08_reporting" / "fine_tuning.csv")
    assert set(table["lam"]) == {0.0, 1.0}
    assert set(table["epoch"]) == {0, 1}
    assert {"backbone", "lam", "seed", "epoch", "accuracy_test", "accuracy_linear_probe", "iis"} <= set(table)
    assert table["iis"].notna().all() and table["accuracy_test"].between(0, 1).all()
    # both arms start from the same pre-trained backbone: identical epoch-0 scores
    start = table[table["epoch"] == 0].set_index("lam")
    assert start.loc[0.0, "accuracy_linear_probe"] == start.loc[1.0, "accuracy_linear_probe"]
    # ... and it is the study's own prototype score (same prototypes, same sweep settings)
    assert TINY["fine_tuning"]["sweep"] == TINY["sweep"]
    study = pd.read_csv(tiny_run / "data" / "08_reporting" / "iis_scores.csv")
    study = study[(study["backbone"] == "lite0") & (study["concept_type"] == "prototype")].iloc[0]
    # fine-tuning scores the study's concept set, draw 0 (the study's `iis` is the mean over its concept draws)
    assert start.loc[1.0, "iis"] == pytest.approx(study["iis_draw0"], abs=1e-9)
    assert start.loc[1.0, "accuracy_linear_probe"] == pytest.approx(study["accuracy_linear_probe"], abs=1e-9)
    summary = pd.read_csv(tiny_run / "data" / "08_reporting" / "fine_tuning_summary.csv")
    assert len(summary) == 2
    ckpts = list((tiny_run / "data" / "06_models" / "fine_tuning").rglob("backbone.safetensors"))
    assert len(ckpts) == 2
    assert list((tiny_run / "data" / "08_reporting" / "fine_tuning.png").iterdir())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`iis_study.level` = 'fine_tuning'")
    assert len(runs) == 2 * len(TINY["fine_tuning"]["seeds"])
    hist = client.get_metric_history(runs[0].info.run_id, "accuracy_test")
    assert sorted(h.step for h in hist) == [0, 1]
    assert client.list_artifacts(runs[0].info.run_id, "checkpoint")
    # each fine-tuning run carries the images it was fine-tuned on, the study's image set (same digest)
    study_runs = client.search_runs([exp.experiment_id], filter_string="tags.`iis_study.level` = 'backbone'")
    study_digests = {d.dataset.digest for r in study_runs for d in r.inputs.dataset_inputs}
    for run in runs:
        digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
        assert len(digests) == 1 and digests <= study_digests, (digests, study_digests)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert " · fine_tuning · " in parent.info.run_name  # "<env> · <pipeline> · <session id>"
