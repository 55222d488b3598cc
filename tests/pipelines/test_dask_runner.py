"""The Dask runner (``iis_study.runners.DaskRunner``).

* The tiny default study on a local cluster of two worker processes writes the same results as the
  sequential run (``tiny_run``), and the MLflow store holds the same runs, parameters, metrics and
  artifacts.
* Worker logs reach the main process; every node is logged as completed there.
* On toy pipelines (an existing two-process cluster, reached by ``DASK_SCHEDULER_ADDRESS``): memory
  datasets move between workers and free outputs come back, hooks run in the main process in
  dependency order, a failing node is named, unsatisfiable resources are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.hooks import hook_impl

from iis_study.runners import DaskRunner
from tests.kedro_project import TINY, chdir, make_project

pytestmark = pytest.mark.slow  # whole Kedro runs

# -- the study on a local cluster -------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True, scope="module")
def _keep_thread_environment():
    """A ``LocalCluster`` started with Dask's default settings (as an "existing" cluster here)
    writes ``OMP/MKL/OPENBLAS_NUM_THREADS=1`` into this process's environment (the nanny's
    pre-spawn settings); later ``kedro run`` subprocesses of the test session would then compute
    with 1 thread and round differently from in-process runs. Put the environment back."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def dask_run(tiny_run, tmp_path_factory):
    """The tiny study (the project ``tiny_run`` ran sequentially) run again with the DaskRunner on a
    local cluster of 2 worker processes; yields (project, runner, log records)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = make_project(tmp_path_factory.mktemp("dask_study"), TINY)
    runner = DaskRunner(n_workers=2)
    handler = _Records()
    root = logging.getLogger()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        mp.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
        mp.setenv("KEDRO_ENV", "test")  # the pipeline registry reads the env from KEDRO_ENV
        with chdir(project):
            bootstrap_project(project)
            root.addHandler(handler)
            try:
                with KedroSession.create(project_path=project, env="test") as session:
                    session.run(runner=runner)
            finally:
                root.removeHandler(handler)
    return project, runner, handler.records


def _read(path: Path):
    return pd.read_csv(path) if path.suffix == ".csv" else json.loads(path.read_text())


def _assert_same(a, b, where: str) -> None:
    """Strings and ints exactly, floats within 1e-6 (NaN equals NaN)."""
    if isinstance(a, pd.DataFrame):
        assert list(a.columns) == list(b.columns) and a.shape == b.shape, where
        for col in a.columns:
            x, y = a[col], b[col]
            if pd.api.types.is_float_dtype(x) or pd.api.types.is_float_dtype(y):
                assert ((x - y).abs().fillna(0) <= 1e-6).all() and (x.isna() == y.isna()).all(), f"{where}:{col}"
            else:
                assert x.tolist() == y.tolist(), f"{where}:{col}"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_dask_run_writes_the_results_of_the_sequential_run(tiny_run, dask_run):
    project, _, _ = dask_run
    seq_dir, dask_dir = tiny_run / "data" / "08_reporting", project / "data" / "08_reporting"
    files = sorted(p.relative_to(dask_dir) for p in dask_dir.rglob("*") if p.suffix in (".csv", ".json"))
    assert {"iis_scores.csv", "sparsity_curves.csv", "correlation.json", "correlation_scopes.json"} <= {
        str(f) for f in files}
    # (other tests may add the fine-tuning tables to tiny_run: only the default pipeline's files are compared)
    for f in files:  # byte for byte: the docs say "identical", not "close"
        assert (seq_dir / f).read_bytes() == (dask_dir / f).read_bytes(), str(f)
    for b in TINY["backbones"]:  # the versioned plots were written too
        assert list((dask_dir / b / "concept_gallery.png").iterdir())


def test_backbones_ran_on_both_workers(dask_run):
    _, runner, _ = dask_run
    assert len(set(runner.node_workers.values())) == 2
    extract = {runner.node_workers[f"{b}.extract_features"] for b in TINY["backbones"]}
    assert len(extract) == 2, runner.node_workers  # three backbones' extractions on two workers


def _mlflow_store(project: Path) -> dict:
    """Every run of the project's store, keyed by run name (the parent's session id left out)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("iis_study.level") == "study"
               and " · study · " in r.info.run_name]  # "<env> · study · <session id>"
    parent = max(parents, key=lambda r: r.info.start_time)  # other tests may add runs to tiny_run's store
    ids = {parent.info.run_id: "study"}
    ids.update({r.info.run_id: r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") in ids})

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        out = []
        for a in client.list_artifacts(run_id, path):
            out.extend(artifacts(run_id, a.path) if a.is_dir else [a.path])
        return sorted(out)

    store = {}
    for run in (r for r in runs if r.info.run_id in ids):
        name = ids[run.info.run_id]
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
        tags.pop("mlflow.runName", None)
        store[name] = {
            "status": run.info.status,
            "tags": tags,
            "params": run.data.params,
            "metrics": run.data.metrics,
            "steps": {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics},
            "artifacts": artifacts(run.info.run_id),
        }
    return store


def test_mlflow_store_after_a_dask_run_matches_the_sequential_run(tiny_run, dask_run):
    seq, dsk = _mlflow_store(tiny_run), _mlflow_store(dask_run[0])
    assert sorted(seq) == sorted(dsk) == sorted(["study", *TINY["backbones"]])
    for name in seq:
        a, b = seq[name], dsk[name]
        assert a["status"] == b["status"] == "FINISHED", name
        assert a["tags"] == b["tags"], name
        assert a["params"] == b["params"], name
        assert a["steps"] == b["steps"], name
        assert a["artifacts"] == b["artifacts"], name
        _assert_same(a["metrics"], b["metrics"], f"{name} metrics")
    assert "features.cache_key" in dsk["lite0"]["params"] and "prototype.iis" in dsk["lite0"]["metrics"]
    assert "correlation.json" in dsk["study"]["artifacts"]


def test_worker_logs_reach_the_main_process(dask_run):
    _, runner, records = dask_run
    from_workers = [r for r in records if r.process != os.getpid()]
    started = {r.getMessage().split(":")[1].strip() for r in from_workers if r.getMessage().startswith("Running node:")}
    assert "extract_features" in started and "collect_scores" in started, started
    finished = [r.getMessage() for r in records if r.process == os.getpid() and r.getMessage().startswith("Completed node:")]
    assert len(finished) == len(runner.node_workers)
    assert any(m.startswith("Completed node: lite0.extract_features on tcp://") for m in finished)


# -- toy pipelines on an existing cluster -----------------------------------------------------------


def double(x):
    return 2 * x


def add(a, b):
    return a + b


def fail_on_purpose(x):
    raise ValueError(f"no good: {x}")


def pid(x):
    return os.getpid()


def die_once(x, marker):
    """Records its process, then SIGKILLs its own worker the first time it runs; afterwards ``x + 1``."""
    import signal

    path = Path(marker)
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if len(path.read_text().splitlines()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


class _HookLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.outputs: dict[str, dict] = {}
        self.errors: list[tuple[str, Exception]] = []

    @hook_impl
    def before_node_run(self, node, inputs):
        self.calls.append(("before", node.name, os.getpid()))

    @hook_impl
    def after_node_run(self, node, inputs, outputs):
        self.calls.append(("after", node.name, os.getpid()))
        self.outputs[node.name] = dict(outputs)

    @hook_impl
    def on_node_error(self, error, node):
        self.errors.append((node.name, error))


def _hook_manager(hooks):
    from kedro.framework.hooks.manager import _create_hook_manager

    manager = _create_hook_manager()
    manager.register(hooks)
    return manager


def _toy(tmp_path):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline, node
    from kedro_datasets.json import JSONDataset

    pipeline = Pipeline([
        node(double, "params:x", "doubled", name="double"),          # memory dataset, read by two nodes
        node(pid, "doubled", "pid_a", name="pid_a"),                 # free outputs
        node(pid, "x_json", "pid_b", name="pid_b"),
        node(add, ["doubled", "x_json"], "total", name="add"),      # a persisted input
        node(double, "total", "saved", name="save"),                 # a persisted output
    ])
    catalog = DataCatalog({
        "params:x": MemoryDataset(21),
        "x_json": JSONDataset(filepath=str(tmp_path / "x.json")),
        "saved": JSONDataset(filepath=str(tmp_path / "saved.json")),
    })
    catalog.save("x_json", 100)
    return pipeline, catalog


def test_memory_data_hooks_and_free_outputs_on_an_existing_cluster(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    pipeline, catalog = _toy(tmp_path)
    hooks = _HookLog()
    runner = DaskRunner()
    assert runner.scheduler_address == cluster.scheduler_address
    result = runner.run(pipeline, catalog, _hook_manager(hooks))
    assert json.loads((tmp_path / "saved.json").read_text()) == 2 * (42 + 100)
    assert set(result) == {"pid_a", "pid_b", "saved"}
    assert result["pid_a"].load() != os.getpid()  # free memory outputs come back to the main catalog
    assert {c[2] for c in hooks.calls} == {os.getpid()}  # hooks run in the main process
    names = [c[1] for c in hooks.calls if c[0] == "after"]
    assert sorted(names) == sorted(n.name for n in pipeline.nodes)
    position = {(kind, name): i for i, (kind, name, _) in enumerate(hooks.calls)}
    for n in pipeline.nodes:  # a node's after-hook runs before any dependent's before-hook
        for parent in pipeline.node_dependencies[n]:
            assert position[("after", parent.name)] < position[("before", n.name)]
    assert hooks.outputs["add"] == {"total": 142} and hooks.outputs["save"] == {"saved": 284}
    assert hooks.outputs["pid_a"]["pid_a"] == result["pid_a"].load()
    assert set(runner.node_workers) == {n.name for n in pipeline.nodes}


def test_a_failing_node_is_named(cluster, tmp_path, caplog):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(double, "params:x", "y", name="first"), node(fail_on_purpose, "y", "z", name="breaks")])
    hooks = _HookLog()
    runner = DaskRunner(scheduler_address=cluster.scheduler_address)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="no good: 4") as info:
        runner.run(pipeline, DataCatalog({"params:x": MemoryDataset(2)}), _hook_manager(hooks))
    assert any("'breaks'" in note and "worker tcp://" in note for note in info.value.__notes__)
    assert [name for name, _ in hooks.errors] == ["breaks"]
    assert any("Node breaks failed on a Dask worker" in r.getMessage() for r in caplog.records)


def test_resources_no_worker_offers_are_refused(cluster, tmp_path):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(double, "params:x", "y", name="first", namespace="ns")])
    runner = DaskRunner(scheduler_address=cluster.scheduler_address, resources={"GPU": 1})
    with pytest.raises(RuntimeError, match="no Dask worker offers the resources"):
        runner.run(pipeline, DataCatalog({"params:x": MemoryDataset(2)}), _hook_manager(_HookLog()))


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("DASK_N_WORKERS", "two")
    with pytest.raises(ValueError, match="DASK_N_WORKERS"):
        DaskRunner()
    monkeypatch.setenv("DASK_N_WORKERS", "3")
    assert DaskRunner().n_workers == 3
    with pytest.raises(ValueError, match="n_workers"):
        DaskRunner(n_workers=0)
    with pytest.raises(ValueError, match="resources"):
        DaskRunner(resources={"GPU": -1})


def test_a_worker_killed_mid_node_is_replaced_and_the_run_completes(tmp_path):
    """Faults on a cluster: a worker process SIGKILLed while it runs a node. The scheduler gives the
    lost task to a (restarted) worker and the run completes with the results of an undisturbed run;
    the node ran twice (in two processes), every node's hooks ran once, no error was reported.
    (An in-memory output that lived on the killed worker is recomputed by Dask from its lineage.)"""
    from distributed import LocalCluster
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline, node
    from kedro_datasets.json import JSONDataset

    marker = tmp_path / "die_once.txt"
    pipeline = Pipeline([
        node(double, "params:x", "doubled", name="double"),
        node(die_once, ["doubled", "params:marker"], "survived", name="dies_once"),
        node(double, "survived", "saved", name="save"),
    ])
    catalog = DataCatalog({
        "params:x": MemoryDataset(21),
        "params:marker": MemoryDataset(str(marker)),
        "saved": JSONDataset(filepath=str(tmp_path / "saved.json")),
    })
    hooks = _HookLog()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        runner = DaskRunner(scheduler_address=c.scheduler_address)
        runner.run(pipeline, catalog, _hook_manager(hooks))
    assert json.loads((tmp_path / "saved.json").read_text()) == 2 * (2 * 21 + 1)  # as an undisturbed run
    pids = marker.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # killed once, re-run in another worker process
    assert sorted(name for kind, name, _ in hooks.calls if kind == "after") == ["dies_once", "double", "save"]
    assert not hooks.errors
