"""A partial run whose inputs the environment has not written names the pipeline to run first
(validation.check_inputs_exist; the slow tests/pipelines/test_environments.py runs it in Kedro)."""

from types import SimpleNamespace

import pytest

from iis_study.validation import check_inputs_exist


def _pipe(inputs=(), outputs=()):
    return SimpleNamespace(inputs=lambda: set(inputs), all_outputs=lambda: set(outputs))


class _Catalog:
    def __init__(self, there):
        self.there = set(there)

    def exists(self, name):
        return name in self.there


REGISTRY = {"data_processing": _pipe(outputs={"splits"}), "feature_extraction": _pipe({"splits"}, {"a.features"}),
            "interpretability": _pipe({"a.features"}, {"a.scores_prototype"})}


def test_a_missing_input_names_its_pipeline_and_environment():
    with pytest.raises(ValueError, match=r"needs splits.*\(cifar10\).*kedro run --env cifar10 --pipeline data_processing"):
        check_inputs_exist(_pipe({"splits", "params:extraction", "images"}), _Catalog({"images"}), "cifar10", REGISTRY)
    with pytest.raises(ValueError, match=r"kedro run --pipeline feature_extraction` first"):
        check_inputs_exist(_pipe({"a.features"}), _Catalog(set()), None, REGISTRY)


def test_present_inputs_pass():
    check_inputs_exist(_pipe({"splits", "params:x"}), _Catalog({"splits"}), "cifar10", REGISTRY)
