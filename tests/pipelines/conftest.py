"""One tiny Kedro run of the whole study, shared by the pipeline tests."""

from __future__ import annotations

import os

import pytest

from tests.kedro_project import TINY, make_project, run_in_process


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A project copy with tiny parameters, after one in-process ``kedro run``."""
    project = make_project(tmp_path_factory.mktemp("study"), TINY)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    try:
        run_in_process(project)
        yield project
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
