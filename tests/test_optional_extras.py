"""The cluster runner and textual concepts are optional extras: without them the tool says which
extra to install, before any node runs (the rest of the study does not need them)."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from tests.kedro_project import TINY

_real_find_spec = importlib.util.find_spec


def _without(monkeypatch, *names: str) -> None:
    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in names:
            return None
        return _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_dask_runner_without_the_cluster_extra_names_it(monkeypatch):
    from iis_study.runners import DaskRunner

    _without(monkeypatch, "distributed", "dask")
    with pytest.raises(ImportError, match=r"pip install 'iis_study\[cluster\]'"):
        DaskRunner()


def test_textual_concepts_without_the_extra_fail_validation_naming_it(monkeypatch):
    from iis_study.validation import validate_study

    params = copy.deepcopy(TINY)
    params["concepts"]["types"] = ["prototype", "textual"]
    _without(monkeypatch, "open_clip")
    with pytest.raises(ImportError, match=r"pip install 'iis_study\[textual\]'"):
        validate_study(params)


def test_textual_loader_without_the_extra_names_it(monkeypatch):
    import sys

    from iis_study.core.concepts import textual

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'iis_study\[textual\]'"):
        textual.require_open_clip()


def test_the_core_study_imports_without_the_extras():
    """No module of the default study imports dask, distributed or open_clip at import time."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed', 'open_clip'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import iis_study.pipeline_registry, iis_study.hooks, iis_study.settings, iis_study.validation\n"
        "import iis_study.pipelines.concepts.nodes, iis_study.pipelines.interpretability.nodes\n"
        "import iis_study.pipelines.reporting.nodes, iis_study.pipelines.fine_tuning.nodes, iis_study.runners\n"
        "import iis_study.core.concepts.textual, iis_study.core.api\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_the_registry_reads_the_environment_of_a_kedro_command_line():
    from iis_study.study_config import cli_env

    assert cli_env(["/venv/bin/kedro", "viz", "run", "--env", "cifar10"]) == "cifar10"
    assert cli_env(["/venv/bin/kedro", "run", "--env=imagenet", "--pipeline", "x"]) == "imagenet"
    assert cli_env(["kedro", "run", "-e", "test"]) == "test"
    assert cli_env(["kedro", "run"]) is None
    assert cli_env(["/usr/bin/python", "script.py", "--env", "x"]) is None  # only a kedro command line
