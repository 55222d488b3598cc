"""Textual concepts end to end through Kedro, with a small randomly initialised CLIP."""

from __future__ import annotations

import pytest

import copy

import pandas as pd

from tests.kedro_project import TINY, make_project, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def test_textual_concepts_pipeline(tmp_path, monkeypatch):
    params = copy.deepcopy(TINY)
    params["backbones"] = {"lite0": TINY["backbones"]["lite0"]}
    params["concepts"]["types"] = ["textual"]
    project = make_project(tmp_path, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    run_in_process(project)
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv")
    assert scores["concept_type"].tolist() == ["textual"]
    assert 0 <= scores["iis"].iloc[0] <= 0.9
    from iis_study.core.representations.features import load_tensors

    tensors, meta = load_tensors(project / "data" / "05_model_input" / "lite0" / "concepts_textual.safetensors")
    assert meta["kind"] == "projection" and "words" in meta
    assert tensors["projection"].shape[0] == 1280
