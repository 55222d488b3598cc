"""Environments do not collide: each writes under its own data folder, and a partial run that lacks its inputs
names the pipeline to run first (issue: one command, nothing sent, environments apart)."""

from __future__ import annotations

import shutil

import pytest

from tests.kedro_project import run_in_process

pytestmark = pytest.mark.slow  # Kedro runs on the tiny study


def test_a_second_environment_keeps_its_own_data_and_says_what_to_run_first(tiny_run):
    project = tiny_run
    shutil.copytree(project / "conf" / "test", project / "conf" / "other", dirs_exist_ok=True)
    globals_file = project / "conf" / "other" / "globals.yml"
    text = globals_file.read_text() if globals_file.is_file() else ""
    globals_file.write_text(text + "\ndata_dir: data/other\n")
    splits_before = (project / "data" / "02_intermediate" / "splits.csv").read_bytes()
    # right after the first study's full run, a partial run of the new environment stops before any node
    with pytest.raises(Exception, match=r"kedro run --env other --pipeline data_processing") as info:
        run_in_process(project, env="other", pipeline="feature_extraction")
    assert "other.splits" in str(info.value) or "splits" in str(info.value)
    assert not (project / "data" / "other" / "04_feature").exists()
    run_in_process(project, env="other", pipeline="data_processing")
    assert (project / "data" / "other" / "02_intermediate" / "splits.csv").is_file()
    assert (project / "data" / "02_intermediate" / "splits.csv").read_bytes() == splits_before  # side by side
