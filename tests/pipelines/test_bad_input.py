"""Bad parameters fail in seconds, before any node runs, with a message naming the parameter."""

from __future__ import annotations

import copy

import pytest

from tests.kedro_project import TINY, make_project, run_in_process


def _with(**changes):
    params = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        block, _, key = dotted.partition("__")
        if key:
            params[block][key] = value
        else:
            params[block] = value
    return params


CASES = [
    (_with(backbones={"x": {"model": "tf_efficientnet_lite", "weights": "random"}}), "did you mean"),
    (_with(backbones={"x": {"model": "resnet18", "weights": "offline"}}), "checkpoint"),
    (_with(dataset={"kind": "imagefolder", "root": "/no/such/folder"}), "dataset.root"),
    (_with(sweep__sparsities=[0.0, 0.5, 0.3]), "sweep.sparsities"),
    (_with(sweep__sparsities=[0.0, 1.0]), "sweep.sparsities"),
    (_with(concepts__m=0), "concepts.m"),
    (_with(splits__fractions=[0.5, 0.5]), "splits.fractions"),
    (_with(extraction__device="tpu"), "extraction.device"),
    (_with(scoring__n_boot=0), "scoring.n_boot"),
    (_with(correlation__ci=1.5), "correlation.ci"),
    (_with(gallery={"concept_type": "prototype", "sparsity": 0.42, "n_images": 2, "top": 3}), "gallery.sparsity"),
    (_with(backbones={"x": {"model": "tf_efficientnet_lite0", "weights": "random", "layer": "stage9"}}),
     r"backbones.x.layer = 'stage9' is not a layer.*\['stage1', 'stage2', 'stage3', 'stage4', 'stage5', 'penultimate'\]"),
    (_with(backbones={"x": {"model": "tf_efficientnet_lite0", "weights": "random", "input_size": 16}}),
     r"backbones.x.input_size = 16 is below the minimum resolution .* 32 px"),
    (_with(families={"f": {"model": "tf_efficientnet_lite0", "weights": "random", "layers": ["stage2", "head"],
                           "resolutions": [64]}}), r"families.f.layers \(f@64/head\) = 'head'.*has the layers"),
    (_with(families={"f": {"model": "tf_efficientnet_lite0", "weights": "random", "layers": ["stage2"],
                           "resolutions": [64, 8]}}), r"families.f.resolutions \(f@8/stage2\) = 8 is below"),
    (_with(correlation__groups=["all", "families"]), "correlation.groups"),
]


@pytest.mark.parametrize("params,message", CASES, ids=[c[1] for c in CASES])
def test_bad_parameters_fail_before_any_node(tmp_path, params, message):
    """A ValueError (the failure-mode table's promise; a missing folder is a FileNotFoundError), or
    Kedro's ParameterValidationError carrying the block's ValueError message when Kedro built the typed
    parameter block of a node (core/<stage>/blocks.py) before the run."""
    from kedro.validation.exceptions import ParameterValidationError

    project = make_project(tmp_path, params)
    expected = FileNotFoundError if message == "dataset.root" else (ValueError, ParameterValidationError)
    with pytest.raises(expected, match=message):
        run_in_process(project)
    assert not (project / "data" / "02_intermediate" / "splits.csv").exists()


def test_m_larger_than_elements_names_the_parameter(tmp_path):
    params = _with(concepts__m=5000)
    params["backbones"] = {"lite0": TINY["backbones"]["lite0"]}
    project = make_project(tmp_path, params)
    run_in_process(project, pipeline="data_processing")
    with pytest.raises(Exception, match="concepts.m"):
        run_in_process(project, pipeline="concepts")


def test_mlflow_settings_live_in_mlflow_yml(tmp_path, monkeypatch):
    """conf/<env>/mlflow.yml turns tracking off (no store is created); a misspelt key there, or a
    `tracking` block left in the parameters, is an error naming the file, before any node."""
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store would be <project>/mlflow.db
    project = make_project(tmp_path / "off", {**TINY, "tracking": {"enabled": False}})
    run_in_process(project, pipeline="data_processing")
    assert (project / "data" / "02_intermediate" / "splits.csv").exists()
    assert not (project / "mlflow.db").exists()

    project = make_project(tmp_path / "typo", {**TINY, "tracking": {"enabeld": False}})
    with pytest.raises(ValueError, match=r"mlflow.yml: unknown key\(s\) \['enabeld'\]"):
        run_in_process(project, pipeline="data_processing")

    project = make_project(tmp_path / "param", TINY)
    params = yaml.safe_load((project / "conf" / "test" / "parameters.yml").read_text())
    (project / "conf" / "test" / "parameters.yml").write_text(yaml.safe_dump({**params, "tracking": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"tracking is not a parameter.*mlflow.yml"):
        run_in_process(project, pipeline="data_processing")
    assert not (project / "data" / "02_intermediate" / "splits.csv").exists()


def test_a_python_session_of_another_env_stops_before_any_node(tmp_path, monkeypatch):
    """`KedroSession.create(env="test")` without KEDRO_ENV: the registry (which reads the env from the command
    line or KEDRO_ENV, keeping no state) expanded the base study; the validation hook stops the run, naming
    KEDRO_ENV, instead of running the wrong representations."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from tests.kedro_project import chdir

    project = make_project(tmp_path, TINY)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    with chdir(project):
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env="test") as session:
            with pytest.raises(ValueError, match=r"lite0_stage1.*KEDRO_ENV=test"):
                session.run(pipeline_names=["feature_extraction"])
    assert not any((project / "data" / "04_feature").iterdir())


def test_a_dataset_block_among_the_parameters_names_globals_yml(tmp_path):
    """The images are read from globals.yml; a `dataset` block left in parameters.yml (the old place) would
    be validated and logged but not read: an error before any node, naming globals.yml."""
    import yaml

    project = make_project(tmp_path, TINY)
    path = project / "conf" / "test" / "parameters.yml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**params, "dataset": {"kind": "digits", "image_size": 48}}))
    with pytest.raises(ValueError, match="move the dataset block to globals.yml"):
        run_in_process(project, pipeline="data_processing")
    assert not (project / "data" / "02_intermediate" / "splits.csv").exists()
