"""Nothing is sent: a run of the default pipeline attempts no outbound connection (issue 25, part 3).

The project ships ``.telemetry`` with ``consent: false`` (Kedro's telemetry plugin reads it for every
command started in the project), so telemetry is off without ``KEDRO_DISABLE_TELEMETRY``. The guard
is a ``sitecustomize`` module on the subprocess's path that refuses, and records, every name lookup
and connection to an address that is not on this machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.kedro_project import TINY, make_project

GUARD = '''
import os, socket
_LOG = os.environ["IIS_NET_LOG"]
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}
def _record(what):
    with open(_LOG, "a") as f:
        f.write(what + "\\n")
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL and not str(host).startswith("127."):
        _record(f"lookup {host}")
        raise socket.gaierror(socket.EAI_NONAME, "outbound connections are refused in this test")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if host not in _LOCAL and not str(host).startswith("127."):
            _record(f"connect {address}")
            raise ConnectionRefusedError("outbound connections are refused in this test")
    return _connect(self, address)
socket.socket.connect = connect
'''


def _run(project: Path, guard_dir: Path, log: Path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("KEDRO_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), env.get("PYTHONPATH", "")])
    env["IIS_NET_LOG"] = str(log)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    kedro = str(Path(sys.executable).with_name("kedro"))
    return subprocess.run([kedro, "run", "--env", "test"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.slow
def test_the_default_pipeline_attempts_no_outbound_connection(tmp_path):
    params = {**TINY, "backbones": {"lite0": TINY["backbones"]["lite0"]},
              "concepts": {**TINY["concepts"], "types": ["prototype"]}}
    project = make_project(tmp_path / "project", params)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    # the guard works: a lookup from a child that has it is refused and recorded
    import subprocess

    probe = subprocess.run([sys.executable, "-c", "import socket\ntry:\n socket.getaddrinfo('example.org', 443)\nexcept OSError:\n pass"],
                           env={**os.environ, "PYTHONPATH": str(guard), "IIS_NET_LOG": str(log)}, check=True)
    assert probe.returncode == 0 and "lookup example.org" in log.read_text()
    log.unlink()
    out = _run(project, guard, log)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not log.exists() or log.read_text() == "", log.read_text()
    assert "telemetry" not in (out.stdout + out.stderr).lower()
