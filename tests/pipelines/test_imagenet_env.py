"""The paper-scale environment (`conf/imagenet`): it validates, stops before any node without its
data, and every architecture in it builds (random weights: no internet here) and embeds an image."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from iis_study.core.representations.backbones import BackboneParams, build
from iis_study.study_config import study_parameters
from iis_study.validation import validate_study
from tests.kedro_project import make_project, run_in_process

ROOT = Path(__file__).resolve().parents[2]

# the paper's model zoo, as far as timm has it (METHOD §6)
PAPER_ZOO = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
    "vit_base_patch16_224", "vit_large_patch16_224",
}


def _params() -> dict:
    """The environment's parameters, its representations expanded (base entries it removes with null left out)."""
    from iis_study.study_config import expanded_parameters

    return expanded_parameters(study_parameters(env="imagenet", conf_source=str(ROOT / "conf")))


def test_imagenet_env_has_the_paper_zoo_with_hub_weights_and_budget():
    params = _params()
    backbones = params["backbones"]
    assert {b["model"] for b in backbones.values()} == PAPER_ZOO
    assert all(b["weights"] == "hub" for b in backbones.values())
    from iis_study.core.heads.datatypes import sweep_config

    budget = sweep_config(params["sweep"]).plan(int(0.6 * 1_281_167))
    assert (budget.batch_size, budget.epochs) == (1024, 30)  # the authors' budget


def test_imagenet_env_validates_when_its_data_is_there(tmp_path):
    (tmp_path / "n01440764").mkdir()
    params = _params()
    params["dataset"]["root"] = str(tmp_path)
    validate_study(params)  # every pipeline, fine-tuning included


def test_kedro_run_env_imagenet_stops_before_any_node_without_data(tmp_path):
    project = make_project(tmp_path)  # a copy of conf/ with an empty data/
    with pytest.raises(FileNotFoundError, match=r"dataset.root .data/01_raw/imagenet. does not exist"):
        run_in_process(project, env="imagenet")
    assert not (project / "data" / "02_intermediate" / "splits.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_params()["backbones"]))
def test_every_imagenet_model_builds_with_random_weights(name):
    """Random weights (the hub is not reachable here) at timm's default input size, one image."""
    entry = dict(_params()["backbones"][name])
    spec = BackboneParams.from_params(name, {**entry, "weights": "random", "seed": 0})
    rep = build(spec)
    assert rep.input_size == 224
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8))
    with torch.no_grad():
        z = rep.forward_uint8(x)
    assert z.shape == (1, rep.dim) and rep.dim >= 512 and torch.isfinite(z).all()
    del rep
    gc.collect()
