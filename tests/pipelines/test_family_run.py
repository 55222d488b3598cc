"""A study with a ``families`` block: its members at one resolution share one forward pass."""

from __future__ import annotations

import pytest

import copy

import pandas as pd
import torch

from iis_study.core.representations import backbones as B
from iis_study.core.representations import features as F
from tests.kedro_project import TINY, make_project, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def _family_study() -> dict:
    p = copy.deepcopy(TINY)
    p["splits"]["max_per_class"] = 10
    p["backbones"] = {"lite0": copy.deepcopy(TINY["backbones"]["lite0"])}
    p["families"] = {"lite0": {"layers": ["stage3", "penultimate"], "resolutions": [32]}}
    p["concepts"].update(types=["prototype"], images_per_class=1, element_kinds=["patches"])
    p["sweep"]["epochs"] = 2
    p["tracking"] = {"enabled": False}
    return p


def test_family_members_share_one_forward_pass(tmp_path):
    project = make_project(tmp_path / "family", _family_study())
    before = F.FORWARD_PASSES["count"]
    run_in_process(project)
    passes = F.FORWARD_PASSES["count"] - before
    # 100 images and 10 x 16 patch elements in batches of 64: 2 + 3 passes for both layers together
    assert passes == 5, passes
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv")
    assert sorted(scores["representation"]) == ["lite0@32/penultimate", "lite0@32/stage3"]
    assert scores["iis"].notna().all()
    # each member's features are what extracting that layer alone gives
    spec = B.BackboneParams.from_params("one", {**TINY["backbones"]["lite0"], "layer": "stage3"})
    feats, _ = F.load_tensors(project / "data" / "04_feature" / "lite0_r32_stage3" / "features.safetensors")
    alone = B.build(spec)
    assert feats["train.x"].shape[1] == alone.dim == 40
    info = (project / "data" / "04_feature" / "lite0_r32_stage3" / "feature_info.json").read_text()
    assert alone.weights_fingerprint in info
    assert torch.isfinite(feats["train.x"]).all()
