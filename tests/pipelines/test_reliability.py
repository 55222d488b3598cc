"""Reliability of whole runs: determinism, interrupted runs, bad data in a real project.

* Determinism: two runs with the same seeds write byte-identical results on the CPU.
* Interrupted runs: a ``kedro run`` started as a subprocess is signalled by its pid during
  feature extraction (SIGINT) and during the sweep (SIGKILL); nothing half-written is left, a
  finished backbone's features are not recomputed, and the resumed run ends with the results of
  an uninterrupted run.
* Data faults: unreadable images stop the run naming the file, or (``on_bad_image: skip``) are
  counted in the log, in ``feature_info`` and in MLflow.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iis_study.core.representations.features import load_tensors
from iis_study.datasets import AtomicCSVDataset, AtomicJSONDataset, SweepResultDataset
from tests.kedro_project import TINY, kedro_cli, make_project, run_in_process

pytestmark = pytest.mark.slow  # whole Kedro runs


def _small_study() -> dict:
    """TINY cut down: 2 backbones, 2 concept types, 15 images per class, patches only, no MLflow."""
    p = copy.deepcopy(TINY)
    p["splits"]["max_per_class"] = 15
    p["backbones"] = {k: p["backbones"][k] for k in ("lite0", "lite0_random")}
    # windows for the signals, wide against the test's 10 ms polling on a loaded machine: the second
    # backbone's extraction at 160 px takes ~1.2 s (the Ctrl-C lands in it), and each sweep ~0.15 s
    # (the kill lands between two sweeps); at 32 px and 10 epochs they took ~0.2 s and ~0.06 s
    p["backbones"]["lite0_random"]["input_size"] = 160
    p["concepts"].update(types=["prototype", "cluster"], images_per_class=1, element_kinds=["patches"])
    p["sweep"]["epochs"] = 30
    p["tracking"] = {"enabled": False}
    return p


PARAMS = _small_study()
N_SWEEPS = len(PARAMS["backbones"]) * len(PARAMS["concepts"]["types"])
PLAIN_LOGGING = """\
version: 1
disable_existing_loggers: False
formatters:
  plain: {format: "%(asctime)s %(levelname)s %(name)s: %(message)s"}
handlers:
  console: {class: logging.StreamHandler, formatter: plain, stream: ext://sys.stdout}
loggers:
  kedro: {level: INFO}
  iis_study: {level: INFO}
root: {handlers: [console], level: WARNING}
"""


# --------------------------------------------------------------------------- helpers


def _start(project: Path, log_name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """``kedro run --env test [args]`` in the background, one plain log line per record."""
    (project / "logging.yml").write_text(PLAIN_LOGGING)
    log = project / log_name
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "KEDRO_LOGGING_CONFIG": str(project / "logging.yml"),
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    kedro = str(Path(sys.executable).with_name("kedro"))
    cmd = [sys.executable, "-c", _DEFAULT_SIGINT_EXEC, kedro, "run", "--env", "test", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


# Runs the command in argv[1:] (same pid, via exec) with SIGINT at its default action. A test session
# started as a background job of a non-interactive shell (``make test &``) has SIGINT ignored,
# children inherit that, and Python then installs no KeyboardInterrupt handler: the run would
# ignore Ctrl-C (seen in clean-clone runs started that way: ``SigIgn`` had SIGINT set, rc 0).
# (Not ``preexec_fn``: it is unsafe in a process with threads, as this test process has.)
_DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _wait_for(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 240) -> re.Match:
    """Poll ``log`` until ``pattern`` appears; fail if the run ends or the time runs out first."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = regex.search(log.read_text())
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    rc = proc.wait(timeout)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def _content(path: Path) -> bytes:
    """A file's bytes; for safetensors its tensors and metadata in a fixed order (the header's
    JSON key order is not fixed from one process to the next)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    tensors, meta = load_tensors(path)
    parts = [json.dumps(sorted(meta.items())).encode()]
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        parts += [f"{key}:{t.dtype}:{tuple(t.shape)}".encode(), t.numpy().tobytes()]
    return b"\0".join(parts)


def _results(project: Path) -> dict[str, bytes]:
    """Every result file of a run (tables, JSON, tensors, sweeps), except versioned plots."""
    data = project / "data"
    return {
        str(p.relative_to(data)): _content(p)
        for p in sorted(data.rglob("*"))
        if p.is_file() and not any(part.endswith(".png") for part in p.parts) and not p.name.startswith(".")
    }


def _assert_same_results(a: Path, b: Path) -> None:
    ra, rb = _results(a), _results(b)
    assert sorted(ra) == sorted(rb)
    differ = [name for name in ra if ra[name] != rb[name]]
    assert not differ, f"files that differ between the two runs: {differ}"
    assert "08_reporting/iis_scores.csv" in ra and "08_reporting/sparsity_curves.csv" in ra


def _temporary_files(project: Path) -> list[str]:
    return [str(p) for p in (project / "data").rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name]


def _assert_everything_readable(project: Path) -> None:
    """No file a later run would trust is half-written: every output under its final name loads."""
    data = project / "data"
    for f in data.rglob("*.safetensors"):
        if not any(part.startswith(".") for part in f.relative_to(data).parts):
            load_tensors(f)
    for meta in data.glob("06_models/*/sweep_*/meta.json"):
        SweepResultDataset(str(meta.parent)).load()
    for f in data.rglob("*.csv"):
        if not any(part.startswith(".") for part in f.relative_to(data).parts):
            pd.read_csv(f)
    for f in data.rglob("*.json"):
        if not any(part.startswith(".") for part in f.relative_to(data).parts):
            json.loads(f.read_text())


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _signal_state(pid: int) -> str:
    """The signal lines of a process's /proc status (ignored, blocked, caught), for failure messages."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(process gone)"
    return ", ".join(line.replace("\t", " ") for line in lines if line.startswith(("SigIgn", "SigBlk", "SigCgt")))


def _interrupt_second_extraction(tmp_path: Path) -> tuple[Path, Path]:
    """Start the small study and send Ctrl-C (SIGINT) once the first backbone's features are done,
    i.e. during the second extraction (~1.2 s). Returns the project and the log of the run."""
    project = make_project(tmp_path / "interrupted", PARAMS)
    proc, log = _start(project, "1-sigint.log")
    _wait_for(proc, log, r"Completed node: \w+\.extract_features")
    state = _signal_state(proc.pid)
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(120)
    assert rc != 0, f"SIGINT did not stop the run (rc 0); its signal state: {state}\n{log.read_text()[-3000:]}"
    return project, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the small study, in this process."""
    project = make_project(tmp_path_factory.mktemp("reference"), PARAMS)
    run_in_process(project)
    return project


# --------------------------------------------------------------------------- determinism


def test_two_runs_with_the_same_seeds_write_identical_results(reference, tmp_path):
    """A second run, in a fresh project and a separate process, writes the same bytes."""
    again = make_project(tmp_path / "again", PARAMS)
    done = kedro_cli(again, "run")
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_same_results(reference, again)
    scores = pd.read_csv(again / "data" / "08_reporting" / "iis_scores.csv")
    assert len(scores) == N_SWEEPS and scores["iis"].notna().all()


# --------------------------------------------------------------------------- interrupted runs


def test_interrupted_runs_resume_to_the_results_of_an_uninterrupted_run(reference, tmp_path):
    # 1. Ctrl-C while the second backbone's features are being extracted
    project, log = _interrupt_second_extraction(tmp_path)
    cache = project / "data" / "04_feature" / "cache"
    text = log.read_text()
    assert text.count("extract_features") >= 2 and len(re.findall(r"Completed node: \w+\.extract_features", text)) == 1
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 1, entries  # the finished backbone's entry, nothing for the interrupted one
    assert not _temporary_files(project)  # Ctrl-C runs the clean-up
    _assert_everything_readable(project)
    finished = _identity(entries[0])

    # 2. a plain re-run, killed (no clean-up possible) once the first sweep is written
    proc, log = _start(project, "2-sigkill.log")
    _wait_for(proc, log, r"Completed node: \w+\.train_interpreters")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    text = log.read_text()
    assert re.search(rf"cache hit \S*{entries[0].name}", text)  # the finished backbone's features are read
    assert _identity(entries[0]) == finished  # the finished backbone was not recomputed
    sweeps = sorted((project / "data" / "06_models").glob("*/sweep_*/meta.json"))
    assert 1 <= len(sweeps) < N_SWEEPS, sweeps  # killed during the sweep stage
    assert not (project / "data" / "08_reporting" / "iis_scores.csv").exists()
    _assert_everything_readable(project)
    kept = {m.parent: _identity(m) for m in sweeps}

    # 3. resume: only nodes whose outputs are missing run
    proc, log = _start(project, "3-resume.log", "--only-missing-outputs")
    text = _finish(proc, log)
    assert "Skipping" in text and "make_splits" in text.split("Skipping", 1)[1].splitlines()[0]
    for folder, ident in kept.items():  # finished sweeps are reused, not rewritten
        assert _identity(folder / "meta.json") == ident, folder
    assert _identity(entries[0]) == finished
    assert len(list(cache.glob("*.safetensors"))) == len(list((reference / "data/04_feature/cache").glob("*")))
    _assert_same_results(reference, project)
    # what SIGKILL could not clean up is only dot-named temporary files, never read by a run
    assert all(Path(t).name.startswith(".") for t in _temporary_files(project))


# --------------------------------------------------------------------------- atomic tables


@pytest.mark.parametrize(
    "make,data",
    [
        (lambda p: AtomicCSVDataset(filepath=str(p / "t.csv")), pd.DataFrame({"a": [1, 2]})),
        (lambda p: AtomicJSONDataset(filepath=str(p / "t.json")), {"a": [1, 2]}),
    ],
    ids=["csv", "json"],
)
def test_interrupted_table_write_keeps_the_previous_file(tmp_path, monkeypatch, make, data):
    ds = make(tmp_path)
    ds.save(data)
    (before,) = list(tmp_path.iterdir())
    content = before.read_bytes()

    def interrupted(self, data, stream):
        stream.write("half a row")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(ds), "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ds.save(data)
    assert [p.name for p in tmp_path.iterdir()] == [before.name]  # no temporary file left
    assert before.read_bytes() == content  # the old complete file, not half a row


# --------------------------------------------------------------------------- data faults in a project


def _imagefolder(root: Path, n: int = 8) -> Path:
    """3 classes x n random RGB images, plus (in 'ship') one grey and one RGBA image."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "ship"):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(root / "ship" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8)).save(root / "ship" / "rgba.png")
    return root


def _folder_study(root: Path, on_bad_image: str) -> dict:
    p = copy.deepcopy(TINY)
    p["dataset"] = {"kind": "imagefolder", "root": str(root), "on_bad_image": on_bad_image}
    p["splits"]["max_per_class"] = None
    p["backbones"] = {"lite0_random": TINY["backbones"]["lite0_random"]}
    p["concepts"].update(types=["prototype"], images_per_class=2, element_kinds=["patches"])
    return p


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_image_stops_the_run_naming_the_file(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    _truncate(root / "dog" / "5.png")
    project = make_project(tmp_path / "project", _folder_study(root, "error"))
    with pytest.raises(Exception, match=r"cannot read image file '.*dog/5\.png'.*truncated"):
        _run_quiet(project, "feature_extraction")
    assert not list((project / "data" / "04_feature").rglob("*.safetensors"))  # nothing half-done kept


def _run_quiet(project: Path, *pipelines: str) -> dict:
    """Run ``data_processing`` and the named pipelines in this process, tracked in the project's MLflow."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from tests.kedro_project import chdir, kedro_env

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    try:
        with chdir(project), kedro_env("test"):
            bootstrap_project(project)
            with KedroSession.create(project_path=project, env="test") as session:
                return session.run(pipeline_names=["data_processing", *pipelines])
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_skipped_images_are_counted_in_the_log_and_in_mlflow(tmp_path, caplog):
    root = _imagefolder(tmp_path / "imgs")
    _truncate(root / "dog" / "5.png")
    (root / "cat" / "2.png").write_bytes(b"<html>not found</html>")
    total = sum(1 for _ in root.rglob("*.png"))
    project = make_project(tmp_path / "project", _folder_study(root, "skip"))
    with caplog.at_level("WARNING"):
        _run_quiet(project, "feature_extraction")
    assert "2 unreadable image(s) skipped" in caplog.text
    assert "dog/5.png" in caplog.text and "cat/2.png" in caplog.text
    info = json.loads((project / "data" / "04_feature" / "lite0_random" / "feature_info.json").read_text())
    assert info["n_skipped"] == 2
    assert info["n_train"] + info["n_val"] + info["n_test"] == total - 2  # grey and RGBA images are used

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("backbone") == "lite0_random"]
    assert child.data.metrics["images_skipped"] == 2
    assert child.data.params["features.n_skipped"] == "2"


def test_class_too_small_for_a_test_split_is_named(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    for f in sorted((root / "dog").iterdir())[2:]:
        f.unlink()
    project = make_project(tmp_path / "project", _folder_study(root, "error"))
    with pytest.raises(Exception, match=r"class .*has 2 image\(s\); each class needs at least 3"):
        _run_quiet(project)
    assert not (project / "data" / "02_intermediate" / "splits.csv").exists()


def test_skip_lets_the_whole_study_finish(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    params = _folder_study(root, "skip")
    params["concepts"]["images_per_class"] = 20  # every train image is a concept source
    params["tracking"] = {"enabled": False}
    project = make_project(tmp_path / "project", params)
    _run_quiet(project)  # data_processing: the split does not decode images
    table = pd.read_csv(project / "data" / "02_intermediate" / "splits.csv")
    for split in ("train", "test"):  # one unreadable image in train, one in test
        _truncate(Path(table.loc[(table["split"] == split) & (table["class_name"] == "dog"), "item"].iloc[-1]))
    run_in_process(project)
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv")
    assert scores["iis"].notna().all()
    info = json.loads((project / "data" / "04_feature" / "lite0_random" / "feature_info.json").read_text())
    assert info["n_skipped"] == 2
