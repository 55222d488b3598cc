"""The typed parameter blocks (core/<stage>/blocks.py) and how the registry finds its environment."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import yaml

from iis_study.core.concepts.blocks import ConceptParams
from iis_study.core.scoring.blocks import CorrelationParams, ScoringParams
from iis_study.core.representations.blocks import ExtractionParams
from iis_study.core.reporting.blocks import GalleryParams, TrackingParams
from iis_study.core.data import SplitParams
from iis_study.core.data import DatasetParams
from iis_study.core.finetune import FineTuningTrainParams, FineTuningParams
from iis_study.core.heads import SweepParams
from tests.kedro_project import ROOT

BLOCKS = {
    "dataset": DatasetParams, "splits": SplitParams, "extraction": ExtractionParams, "concepts": ConceptParams,
    "sweep": SweepParams, "scoring": ScoringParams, "correlation": CorrelationParams, "gallery": GalleryParams,
    "fine_tuning": FineTuningParams,
}


def _base() -> dict:
    params = {}
    for path in (ROOT / "conf" / "base").glob("parameters_*.yml"):
        params.update(yaml.safe_load(path.read_text()))
    params["dataset"] = yaml.safe_load((ROOT / "conf" / "base" / "globals.yml").read_text())["dataset"]
    return params


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_shipped_block_builds_and_survives_pickling(block):
    """Kedro builds typed blocks with ``cls(**yaml)``; the Dask runner pickles them."""
    cls = BLOCKS[block]
    built = cls(**_base()[block])
    assert pickle.loads(pickle.dumps(built)) == built
    assert cls.from_params(built) is built and cls.from_params(None) == cls()


def test_a_key_left_out_takes_the_one_default():
    assert ConceptParams(m=7).segments.n_segments == (10, 20, 30) and ConceptParams(m=7).types == ConceptParams.types
    assert FineTuningParams(train={"epochs": 1}).train.bn_mode == FineTuningTrainParams().bn_mode
    assert FineTuningParams().sweep == SweepParams()


@pytest.mark.parametrize("cls,values,message", [
    (SweepParams, {"stepz": 5}, r"sweep: unknown key\(s\) \['stepz'\]"),
    (ConceptParams, {"segments": {"n_jobz": 2}}, r"concepts.segments: unknown key\(s\) \['n_jobz'\]"),
    (ConceptParams, {"m": 0}, "concepts.m must be a positive integer"),
    (ConceptParams, {"types": ["prototype", "words"]}, "concepts.types must be a non-empty subset"),
    (SplitParams, {"fractions": [0.5, 0.5]}, "splits.fractions"),
    (CorrelationParams, {"groups": "families"}, "correlation.groups"),
    (GalleryParams, {"sparsity": 1.0}, "gallery.sparsity"),
    (ScoringParams, {"ci": 1.0}, "scoring.ci"),
    (TrackingParams, {"enabeld": True}, r"mlflow.yml: unknown key\(s\) \['enabeld'\] under tracking"),
    (ExtractionParams, {"cache_dir": "x"}, "feature_cache` catalog entry"),
    (FineTuningParams, {"checkpoint_dir": "x"}, "fine_tuning_checkpoints` catalog entry"),
    (FineTuningParams, {"train": {"lr_heads": -1.0}}, r"fine_tuning\.lr_heads"),
])
def test_a_bad_value_names_the_parameter(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls(**values)


def test_yaml_lists_become_tuples_and_blocks_stay_frozen():
    sweep = SweepParams(sparsities=[0.0, 0.5], seeds=[1])
    assert sweep.sparsities == (0.0, 0.5) and sweep.seeds == (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sweep.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("argv,env", [
    (["/venv/bin/kedro", "run", "--env", "cifar10"], "cifar10"),
    (["/venv/bin/kedro", "viz", "run", "--env=cifar10"], "cifar10"),
    (["kedro", "run", "-e", "imagenet"], "imagenet"),
    (["/venv/bin/iis-study", "--env", "cifar10"], "cifar10"),
    (["/repo/src/iis_study/__main__.py", "--env", "cifar10"], "cifar10"),
    (["/venv/bin/pytest", "--env", "cifar10"], None),  # not a command line of this project
    (["kedro", "run"], None),
])
def test_the_registry_reads_the_env_of_the_command_line(argv, env):
    from iis_study.study_config import cli_env

    assert cli_env(argv) == env


def test_reading_parameters_leaves_the_sessions_globals_resolver_alone(tmp_path):
    """Kedro's config loader registers ``${globals:...}`` process-wide; the registry's own read must not
    replace the running session's (else its catalog would resolve another environment's images)."""
    from omegaconf import OmegaConf

    from iis_study.study_config import study_parameters

    OmegaConf.register_new_resolver("globals", lambda key, default=None: "the session's", replace=True)
    try:
        params = study_parameters(env="cifar10", conf_source=ROOT / "conf")
        assert params["dataset"]["root"] == "data/01_raw/cifar10"  # resolved by the registry's own loader
        assert OmegaConf.create({"x": "${globals:dataset}"}).x == "the session's"
    finally:
        OmegaConf.clear_resolver("globals")
