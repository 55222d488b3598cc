"""The study with out-of-core features (extraction.storage: sharded) on tiny data."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from iis_study.core.representations.store import ShardedArray
from iis_study.datasets import TensorDictDataset
from tests.kedro_project import TINY, make_project, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def _params(storage: dict) -> dict:
    p = copy.deepcopy(TINY)
    p["backbones"] = {k: TINY["backbones"][k] for k in ("lite0", "lite0_random")}
    p["concepts"]["types"] = ["prototype", "end_to_end"]
    p["extraction"].update(storage)
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, storage in (
        ("memory", {"storage": "memory"}),
        ("sharded", {"storage": "sharded", "storage_dtype": "float16", "shard_rows": 40}),
    ):
        project = make_project(tmp_path_factory.mktemp(name), _params(storage))
        run_in_process(project, pipeline="__default__")
        out[name] = project
    return out


def test_sharded_features_are_shards_on_disk_linked_from_the_cache(runs):
    project = runs["sharded"]
    feats = TensorDictDataset(str(project / "data/04_feature/lite0/features.safetensors")).load()
    x = feats["train.x"]
    assert isinstance(x, ShardedArray) and x.storage_dtype == "float16"
    assert len(x.blocks()) == int(np.ceil(len(feats["train.y"]) / 40)) > 1
    shard = x.root / "x.00000.npy"
    assert shard.stat().st_nlink >= 2  # a hard link into the extraction cache, not a copy
    mem = TensorDictDataset(str(runs["memory"] / "data/04_feature/lite0/features.safetensors")).load()
    # the same features, rounded to float16
    torch.testing.assert_close(x.to_tensor(), mem["train.x"].half().float(), rtol=0, atol=0)
    assert torch.equal(feats["test.index"], mem["test.index"])


def test_sharded_study_scores_every_backbone_and_concept_type(runs):
    mem = pd.read_csv(runs["memory"] / "data/08_reporting/iis_scores.csv")
    sh = pd.read_csv(runs["sharded"] / "data/08_reporting/iis_scores.csv")
    key = ["backbone", "concept_type"]
    assert sorted(map(tuple, sh[key].values)) == sorted(map(tuple, mem[key].values))
    assert sh["iis"].notna().all() and sh["accuracy_linear_probe"].between(0, 1).all()
    # the linear probe is a convex problem: streaming order and float16 storage barely move it
    merged = mem.merge(sh, on=key, suffixes=("_mem", "_sh"))
    assert (merged["accuracy_linear_probe_mem"] - merged["accuracy_linear_probe_sh"]).abs().max() <= 0.1


def test_bad_storage_parameter_is_named(tmp_path):
    from iis_study.validation import validate_study

    p = _params({"storage": "disk"})
    with pytest.raises(ValueError, match="extraction.storage"):
        validate_study(p)
