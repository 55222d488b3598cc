"""Real data: CIFAR-10 JPEGs from ../shared (skipped when absent)."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from tests.kedro_project import ROOT, TINY, make_project, run_in_process

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} is absent"),
]


def test_pretrained_lite0_beats_its_random_control_on_cifar10(tmp_path, monkeypatch):
    params = copy.deepcopy(TINY)
    params["dataset"] = {"kind": "imagefolder", "root": str(CIFAR), "image_size": 32, "on_bad_image": "error"}
    params["splits"] = {"fractions": [0.6, 0.2, 0.2], "seed": 0, "max_per_class": 200}
    params["backbones"] = {
        "lite0": {"model": "tf_efficientnet_lite0", "weights": "offline", "input_size": 64},
        "lite0_random": {"model": "tf_efficientnet_lite0", "weights": "random", "input_size": 64},
    }
    params["concepts"].update({"types": ["prototype"], "m": 200, "images_per_class": 10, "element_size": 32,
                               "draws": 2, "nulls": ["random"]})
    params["sweep"] = {"sparsities": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98], "learning_rates": [0.001, 0.01, 0.1],
                       "seeds": [0, 1], "epochs": 30, "batch_size": 1024, "gamma": 0.99, "device": "cpu",
                       "l2_grid": [0.1, 1.0, 10.0]}
    params["scoring"] = {"n_boot": 500, "seed": 0, "ci": 0.95}
    project = make_project(tmp_path, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    run_in_process(project)
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv").set_index("backbone")
    print(scores[["accuracy_linear_probe", "iis", "iis_ci_low", "iis_ci_high", "iis_chance_corrected",
                  "iis_null_random", "iis_excess_random"]].to_string())
    assert scores["iis_null_random"].notna().all() and (scores["n_draws"] == 2).all()
    assert scores.loc["lite0", "accuracy_linear_probe"] > scores.loc["lite0_random", "accuracy_linear_probe"] + 0.05
