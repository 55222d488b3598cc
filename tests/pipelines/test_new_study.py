"""`iis-study new`: a study of one's own images and backbones in one command, from a project copy (a tiny
ImageFolder made here, a timm model with random weights: no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.kedro_project import TINY, make_project

pytestmark = pytest.mark.slow  # a whole Kedro run


def _image_folder(root: Path, classes: int = 3, per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            img[:, :, c] += 150  # each class its own colour
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def test_one_command_writes_runs_and_prints_a_study(tmp_path):
    project = make_project(tmp_path / "project")
    images = _image_folder(tmp_path / "images")
    small = {k: TINY[k] for k in ("extraction", "scoring")}
    small["splits"] = {"fractions": [0.6, 0.2, 0.2], "seed": 0, "max_per_class": 16}
    small["concepts"] = {**TINY["concepts"], "types": ["prototype"], "draws": 1, "nulls": ["random"]}
    small["sweep"] = {"sparsities": [0.0, 0.5, 0.9], "l2_grid": [1.0, 100.0], "device": "cpu"}
    small["correlation"] = {"n_boot": 50}
    small["weight_sparsity"] = {"path_length": 6}
    (tmp_path / "small.yml").write_text(yaml.safe_dump(small))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "KEDRO_DISABLE_TELEMETRY": "true"}
    env.pop("KEDRO_ENV", None)
    cmd = [str(Path(sys.executable).with_name("iis-study")), "new", "mine", "--images", str(images),
           "--backbone", "lite0r=tf_efficientnet_lite0:random", "--params", str(tmp_path / "small.yml")]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = yaml.safe_load((project / "conf" / "mine" / "parameters.yml").read_text())
    assert written["backbones"]["lite0r"] == {"model": "tf_efficientnet_lite0", "weights": "random"}
    assert "lite0r_random" not in written["backbones"]  # a random-weight backbone is its own control
    assert all(v is None for k, v in written["backbones"].items() if k != "lite0r")  # base's left out
    glob = yaml.safe_load((project / "conf" / "mine" / "globals.yml").read_text())
    assert glob == {"dataset": {"kind": "imagefolder", "root": str(images)}, "data_dir": "data/mine"}
    scores = pd.read_csv(project / "data" / "mine" / "08_reporting" / "iis_scores.csv")
    assert list(scores["backbone"]) == ["lite0r"] and scores["iis_null_random"].notna().all()
    assert not (project / "data" / "08_reporting" / "iis_scores.csv").exists()  # the base study's folder untouched
    out = proc.stdout
    assert "IIS of study 'mine'" in out and "lite0r" in out and "null random" in out and "certified" in out
    # what a study this small can tell (docs/calibration.md): the range, the detectable excess, the reading
    assert "not a ceiling" in out and "Size check (two-sided 5% level, power 80%" in out
    row = scores.iloc[0]
    assert row["n_test"] == 9 and row["iis_excess_random_detectable"] > 0 and row["iis_detectable_difference"] > 0
    assert f"detectable {row['iis_excess_random_detectable']:.3f}" in out and "reading: " in out
    if row["iis_excess_random_ci_low"] <= 0 <= row["iis_excess_random_ci_high"]:  # 9 test images: as expected
        assert "reading: not distinguishable from random (this study detects excesses >=" in out
        assert ("WARNING too few test images (9) for the random null: this study detects excesses >=" in out
                or "NOTE on the random null" in out)  # NOTE: the concept draw's spread, not the images
    import mlflow

    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = {k for r in runs for k in r.data.metrics}
    assert {"prototype.iis_excess_random_detectable", "prototype.iis_detectable_difference"} <= logged
    # bad input is named before anything is written or run
    bad = subprocess.run([*cmd[:2], "other", "--images", str(tmp_path / "nowhere"), "--backbone", "resnet18"],
                         cwd=project, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--images" in bad.stderr and not (project / "conf" / "other").exists()


def test_pretrained_backbones_get_their_random_control_written():
    from iis_study.new_study import parse_backbone, study_files

    key, entry = parse_backbone("resnet18:hub:stage3")
    assert (key, entry) == ("resnet18", {"model": "resnet18", "weights": "hub", "layer": "stage3"})
    files = study_files("s", Path("/img"), {key: entry}, True, ["lite0", "resnet18"])
    assert files["parameters.yml"]["backbones"] == {
        "lite0": None, "resnet18": entry, "resnet18_random": {**entry, "weights": "random", "seed": 0}}
    assert study_files("s", Path("/img"), {key: entry}, False, [])["parameters.yml"]["backbones"] == {key: entry}
