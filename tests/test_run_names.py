"""MLflow parent runs are named after the environment and the pipeline (hooks.parent_run_name)."""

from iis_study.hooks import parent_run_name


def test_parent_runs_say_which_study_and_pipeline():
    assert parent_run_name(None, None, "2026-12-02T17.36.10") == "base · study · 2026-12-02T17.36.10"
    assert parent_run_name("local", ["__default__"], "x") == "base · study · x"
    assert parent_run_name("cifar10", ["fine_tuning"], "x") == "cifar10 · fine_tuning · x"
    assert parent_run_name("cifar10", ["data_processing", "feature_extraction"], None) == (
        "cifar10 · data_processing+feature_extraction")
