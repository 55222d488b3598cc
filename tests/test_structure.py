"""The shape of the code (issue: "one shape for the whole house"), checked from the source text.

- a pipeline's nodes import only the library (``iis_study.core``), Kedro and third-party packages, never
  another pipeline or project module;
- no source file above ~600 lines;
- the pipeline registry's path keeps no module-level mutable state (it reads the parameters itself);
- no parameter default is written outside the typed blocks: nodes, validation and hooks hold no
  ``params.get("key", default)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "iis_study"
NODES = sorted(SRC.glob("pipelines/*/nodes.py"))
MAX_LINES = 600


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


def test_there_are_nodes_modules():
    assert len(NODES) == 6, NODES


@pytest.mark.parametrize("path", NODES, ids=lambda p: p.parent.name)
def test_nodes_import_only_the_library(path):
    bad = [m for m in _imports(path) if m.startswith(".") or (m.startswith("iis_study") and not m.startswith("iis_study.core"))]
    assert not bad, f"{path.relative_to(SRC)} imports {bad}: a node calls iis_study.core, never another pipeline"


def test_no_source_file_above_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


@pytest.mark.parametrize("module", ["pipeline_registry.py", "study_config.py", "pipelines/namespaces.py"])
def test_the_registry_path_keeps_no_module_level_mutable_state(module):
    tree = ast.parse((SRC / module).read_text())
    mutable = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp, ast.Call)
    state = [
        ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target)
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, mutable)
        and not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) in ("Path(__file__).resolve", "Path"))
        and "Path(__file__)" not in ast.unparse(node.value)
    ]
    globals_used = [n for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not state and not globals_used, f"{module}: module-level mutable state {state}"


@pytest.mark.parametrize(
    "path", [*NODES, SRC / "validation.py", SRC / "hooks.py", SRC / "pipeline_registry.py"], ids=lambda p: p.stem
    if p.stem != "nodes" else p.parent.name
)
def test_no_parameter_default_outside_the_typed_blocks(path):
    """``x.get("key", default)`` on a parameter mapping writes a default a second time; typed blocks
    (iis_study.core.config) hold them. (Metadata lookups with ``{}`` fallbacks are not defaults.)"""
    tree = ast.parse(path.read_text())
    found = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and len(n.args) == 2
        and not (isinstance(n.args[1], ast.Dict) and not n.args[1].keys)
    ]
    assert not found, f"{path.relative_to(SRC)}: defaults written outside core/config.py: {found}"
