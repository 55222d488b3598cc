"""What users open after a run: Kedro-Viz and the comparison notebook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.kedro_project import ROOT, TINY

pytestmark = pytest.mark.slow  # whole Kedro runs


def _free_port() -> int:
    """A free port outside the ephemeral range (Kedro-Viz probes a few ports from the one asked)."""
    for port in range(4300, 4900, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free local port in 4300-4900")


@contextlib.contextmanager
def _served(args: list[str], cwd: Path, env: dict[str, str], url: str, timeout: float = 180):
    """Start ``kedro <args>`` as a server, yield the JSON at ``url`` once it answers, and stop the
    server's whole process group afterwards (SIGTERM, then SIGKILL)."""
    kedro = str(Path(sys.executable).with_name("kedro"))
    proc = subprocess.Popen([kedro, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        data = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    data = json.load(r)
                break
            except OSError:
                time.sleep(1)
        assert data is not None, proc.stdout.read().decode() if proc.poll() is not None else f"{url} did not answer"
        yield data
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_kedro_viz_serves_the_study(tiny_run):
    """`kedro viz run --env test` (a flag, no KEDRO_ENV): Kedro-Viz runs no project hooks, yet the
    registry shows the environment's representations, not the base ones."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "KEDRO_ENV"}
    env["KEDRO_DISABLE_TELEMETRY"] = "true"
    args = ["viz", "run", "--env", "test", "--host", "127.0.0.1", "--port", str(port), "--no-browser"]
    with _served(args, tiny_run, env, f"http://127.0.0.1:{port}/api/main") as data:
        pipelines = {p["id"] for p in data["pipelines"]}
        assert {"__default__", "data_processing", "feature_extraction", "concepts", "interpretability",
                "reporting"} <= pipelines
        names = {n["name"] for n in data["nodes"]}
        for b in TINY["backbones"]:
            assert f"{b}.features" in names
        assert "lite2_random.features" not in names and "lite0_stage1.features" not in names  # base-only
        assert {"iis_scores", "correlation", "iis_vs_accuracy_plot"} <= names
        assert set(TINY["backbones"]) <= set(data["modular_pipelines"])  # one collapsible namespace per backbone


def test_kedro_viz_shows_the_24_cifar10_representations(tmp_path):
    """`kedro viz run --env cifar10` (the flag; no KEDRO_ENV, no hook, no run, no images needed): the
    registry reads the environment's parameters itself and Kedro-Viz lists the 24 representations
    (4 families x 3 layers x 2 resolutions), none of the base study's."""
    from tests.kedro_project import make_project

    project = make_project(tmp_path / "viz")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "KEDRO_ENV"}
    env["KEDRO_DISABLE_TELEMETRY"] = "true"
    args = ["viz", "run", "--env", "cifar10", "--host", "127.0.0.1", "--port", str(port), "--no-browser"]
    with _served(args, project, env, f"http://127.0.0.1:{port}/api/main") as data:
        features = sorted(n["name"].split(".")[0] for n in data["nodes"] if n["name"].endswith(".features"))
        expected = sorted(f"{fam}_r{r}_{layer}" for fam in ("lite0", "lite1", "lite2", "lite0_random")
                          for r in (32, 96) for layer in ("stage3", "stage4", "penultimate"))
        assert features == expected and len(features) == 24
        assert set(expected) <= set(data["modular_pipelines"])


def test_the_registry_keeps_no_state_between_calls(tmp_path, monkeypatch):
    """Each call reads the active environment afresh: KEDRO_ENV=cifar10 gives 24 namespaces, unset gives the
    base study's 6, in one process (a module-level cache would return the first answer twice)."""
    from iis_study.pipeline_registry import register_pipelines
    from tests.kedro_project import chdir, make_project

    project = make_project(tmp_path / "reg")
    with chdir(project):
        monkeypatch.setenv("KEDRO_ENV", "cifar10")
        cifar = {n.namespace for n in register_pipelines()["feature_extraction"].nodes}
        monkeypatch.delenv("KEDRO_ENV")
        base = {n.namespace for n in register_pipelines()["feature_extraction"].nodes}
    assert len(cifar) == 24 and base == {"lite0", "lite1", "lite2", "lite0_random", "lite2_random", "lite0_stage1"}


def test_kedro_jupyter_lab_serves_the_project_kernel(tiny_run, tmp_path):
    """`kedro jupyter lab` (what `make notebook` runs) starts a server on 127.0.0.1 whose default kernel
    is the project's (Kedro creates the `kedro_iis_study` kernel spec)."""
    port, token = _free_port(), "iis-test-token"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "KEDRO_ENV": "test",
           # kernel specs, settings and runtime files in the test's folder, not the user's home
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    args = ["jupyter", "lab", "--ip", "127.0.0.1", "--port", str(port), "--no-browser", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
            *(["--allow-root"] if os.geteuid() == 0 else [])]
    with _served(args, tiny_run, env, f"http://127.0.0.1:{port}/api/kernelspecs?token={token}") as specs:
        assert specs["default"] == "kedro_iis_study" and "kedro_iis_study" in specs["kernelspecs"]


def test_notebook_runs_on_a_finished_study(tiny_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "compare_backbones.ipynb", as_version=4)
    env_before = dict(os.environ)
    os.environ.update({"IIS_PROJECT": str(tiny_run), "KEDRO_ENV": "test",
                       "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_run / 'mlflow.db'}"})
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tiny_run)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = json.dumps(outputs)
    assert "lite0_random" in text and "iis" in text


def test_every_shipped_environment_validates_for_every_pipeline():
    """`kedro run --env cifar10 --pipeline fine_tuning` must not stop on a backbone key that the
    environment's families renamed (base names `lite0`, cifar10 expands it to `lite0_r96_...`)."""
    from pathlib import Path

    from iis_study.study_config import study_parameters
    from iis_study.validation import validate_study

    root = Path(__file__).resolve().parents[2]
    for env in ("base", "cifar10"):
        params = study_parameters(env=None if env == "base" else env, conf_source=str(root / "conf"))
        # the images themselves need not be here (a fresh clone has no data/01_raw/cifar10): digits stand in
        params["dataset"] = {"kind": "digits", "image_size": 32}
        validate_study(params)  # checks fine_tuning.backbones against the expanded representations
