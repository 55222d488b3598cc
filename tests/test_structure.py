"""The shape of the code (issue: "one shape for the whole house"), checked from the source text (the node names
from the pipelines the registry builds).

- a pipeline's nodes import only the library (``iis_study.core``), Kedro and third-party packages, never
  another pipeline or project module; every node function's body is one call into ``iis_study.core``;
- every node is named after its function (``<function>_<concept type>`` for the per-concept-type nodes
  ``score_interpreters`` and ``collect_specification_inputs``), in the default, ``cifar10`` and ``imagenet`` pipelines;
- no source file above ~600 lines;
- the pipeline registry's path keeps no module-level mutable state (it reads the parameters itself);
- no parameter default is written outside the typed blocks: nodes, validation and hooks hold no
  ``params.get("key", default)``;
- no import cycle inside ``iis_study``: every import counts, at module level, inside a function or
  under ``if TYPE_CHECKING:``;
- every ``iis_study...`` logger name written out (``getLogger``, ``caplog``'s ``logger=``, ``conf/logging.yml``)
  names a module or package;
- ``core/`` is its stage packages (every ``core/<package>/__init__.py``, found, not listed) and at most 10 flat
  modules; no arrow runs back up (core importing a pipeline or the plumbing, a pipeline the plumbing, a stage or
  ``params``/``device``/``data`` importing the facade ``core/api.py``, ``params``/``device``/``data`` a stage) and
  no cycle between the stage packages;
- no private (underscore) name crosses a module outside the tests: not in the library, not in ``scripts/*.py``
  (from the library or from another script), by import or as ``module._name``;
- the checks see what they forbid (:func:`test_the_structure_checks_see_what_they_forbid`,
  :func:`test_the_import_graph_sees_every_kind_of_import`, :func:`test_the_one_call_check_sees_a_node_that_computes`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

SRC = Path(__file__).resolve().parents[1] / "src" / "iis_study"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
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
    (``iis_study.core.<stage>.blocks``) hold them. (Metadata lookups with ``{}`` fallbacks are not defaults.)"""
    tree = ast.parse(path.read_text())
    found = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and len(n.args) == 2
        and not (isinstance(n.args[1], ast.Dict) and not n.args[1].keys)
    ]
    assert not found, f"{path.relative_to(SRC)}: defaults written outside the typed blocks: {found}"


# --------------------------------------------------------------------------- node names

PER_CONCEPT_TYPE = ("score_interpreters", "collect_specification_inputs")  # one node per concept type: <func>_<type>


def _misnamed_nodes(pipes: dict, types: list[str]) -> list[str]:
    """Nodes whose name (after the namespace) is not their function's ``__name__`` (``<func>_<type>`` for the
    per-concept-type nodes of :data:`PER_CONCEPT_TYPE`)."""
    bad = []
    for pipe in pipes.values():
        for n in pipe.nodes:
            short = n.name[len(n.namespace) + 1:] if n.namespace else n.name
            func = n.func.__name__
            expected = {f"{func}_{t}" for t in types} if func in PER_CONCEPT_TYPE else {func}
            if short not in expected:
                bad.append(f"{n.name}: runs {func}, expected {' or '.join(sorted(expected))}")
    return sorted(set(bad))


@pytest.mark.parametrize("env", [None, "cifar10", "imagenet"], ids=lambda e: e or "default")
def test_every_node_is_named_after_its_function(env):
    """A node's name (after its namespace) is its function's name, so ``kedro run --nodes`` and the logs name the
    function that runs; the per-concept-type nodes add the type. Pipelines as the registry builds them."""
    from iis_study.pipeline_registry import build_pipelines
    from iis_study.study_config import concept_types, study_parameters

    params = study_parameters(env)
    pipes = build_pipelines(params)
    types = concept_types(params)
    assert types and len(pipes["__default__"].nodes) > 20, (types, len(pipes["__default__"].nodes))
    per_type = {n.name.rpartition(".")[2] for n in pipes["__default__"].nodes if n.func.__name__ in PER_CONCEPT_TYPE}
    assert per_type == {f"{f}_{t}" for f in PER_CONCEPT_TYPE for t in types}, per_type
    bad = _misnamed_nodes(pipes, types)
    assert not bad, "nodes not named after their function:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- import cycles


def _module_name(path: Path) -> str:
    """``iis_study.core.representations.backbones`` for ``core/representations/backbones.py``; a package's ``__init__`` is the package."""
    parts = [SRC.name, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _project_module(name: str) -> str | None:
    """The deepest module of the package that ``name`` lies in (``a.b.func`` -> ``a.b``), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _import_edges(module: str) -> dict[str, list[int]]:
    """Project modules imported by ``module`` -> the lines of those imports. Every import statement
    counts, wherever it stands (module level, function body, ``if TYPE_CHECKING:``); ``from X import y``
    is an arrow to the submodule ``X.y`` when there is one, else to ``X``."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    edges: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):  # beyond the top package: not ours
                    continue
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            found = _project_module(target)
            if found and found != module:
                edges.setdefault(found, []).append(node.lineno)
    return edges


def _import_graph() -> dict[str, dict[str, list[int]]]:
    return {m: _import_edges(m) for m in MODULES}


def _cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # a shortest way from the first module back to itself, inside the component
        start, inside = component[0], set(component)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            following = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in inside and w not in came_from:
                        came_from[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while (v := came_from[path[-1]]) != start:
            path.append(v)
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, list[int]]]) -> str:
    return " -> ".join(cycle) + " (" + "; ".join(
        f"{MODULES[a].relative_to(SRC)}:{graph[a][b][0]} imports {b}" for a, b in zip(cycle, cycle[1:])
    ) + ")"


def test_the_import_graph_sees_every_kind_of_import():
    """The parser resolves what the cycle check relies on (else an empty graph would pass it)."""
    graph = _import_graph()
    assert "iis_study.core.representations.weight_sources" in graph["iis_study.core.representations.backbones"]  # from .weight_sources import name
    assert "iis_study.config_loader" in graph["iis_study.settings"]  # absolute from-import
    assert "iis_study.config_loader" in graph["iis_study.study_config"]  # inside a function
    assert "iis_study.core.representations.backbones" in graph["iis_study.core.representations.blocks"]  # under if TYPE_CHECKING
    assert "iis_study.core" in MODULES and "iis_study" in MODULES  # __init__ is its package


def test_no_import_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles inside iis_study:\n" + "\n".join(_describe(c, graph) for c in cycles)


def _core_names(tree: ast.Module) -> set[str]:
    """Names a nodes module binds to ``iis_study.core`` (its modules and the functions imported from them)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iis_study.core"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.startswith("iis_study.core")}
    return names


def _not_single_core_calls(path: Path) -> list[str]:
    """The node functions of ``path`` whose body (after the docstring and local imports of the library) is not
    ``return <one call into iis_study.core>`` with plain arguments (names, constants, attributes, no other call)."""
    tree = ast.parse(path.read_text())
    core = _core_names(tree)
    bad = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
            continue
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        local = {a.asname or a.name for s in body if isinstance(s, ast.ImportFrom)
                 and (s.module or "").startswith("iis_study.core") for a in s.names}
        body = [s for s in body if not (isinstance(s, ast.ImportFrom) and (s.module or "").startswith("iis_study.core"))]
        ok = len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call)
        if ok:
            call = body[0].value
            root = call.func
            while isinstance(root, ast.Attribute):
                root = root.value
            inner = [n for arg in [*call.args, *(k.value for k in call.keywords)] for n in ast.walk(arg)
                     if isinstance(n, ast.Call | ast.Lambda | ast.ListComp | ast.DictComp | ast.GeneratorExp)]
            ok = isinstance(root, ast.Name) and root.id in core | local and not inner
        if not ok:
            bad.append(f"{fn.name} (line {fn.lineno})")
    return bad


@pytest.mark.parametrize("path", NODES, ids=lambda p: p.parent.name)
def test_every_node_body_is_one_call_into_core(path):
    bad = _not_single_core_calls(path)
    assert not bad, f"{path.relative_to(SRC)}: these nodes do more than call iis_study.core once: {bad}"


def test_the_one_call_check_sees_a_node_that_computes(tmp_path):
    """The check fails a node that computes in the pipeline layer (else an empty check would pass)."""
    src = tmp_path / "nodes.py"
    src.write_text(
        "from iis_study.core import study\n\n"
        "def good(x):\n    '''doc'''\n    return study.f(x)\n\n"
        "def two(x):\n    y = study.f(x)\n    return y\n\n"
        "def nested(x):\n    return study.f(sorted(x))\n\n"
        "def elsewhere(x):\n    return sorted(x)\n"
    )
    assert [b.split(" ")[0] for b in _not_single_core_calls(src)] == ["two", "nested", "elsewhere"]


# --------------------------------------------------------------------------- logger names

def _calls_get_logger(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "getLogger"


def _logger_names(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` for every ``iis_study...`` logger name of ``path``: ``getLogger("...")``, ``logger="..."``
    (``caplog.at_level``) and the names a ``for name in (...)`` loop hands to ``getLogger(name)``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        values: list[ast.expr] = []
        if isinstance(node, ast.Call):
            values = [*(node.args[:1] if _calls_get_logger(node) else []), *(k.value for k in node.keywords if k.arg == "logger")]
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple | ast.List) and isinstance(node.target, ast.Name):
            loop_var = node.target.id
            if any(_calls_get_logger(c) and c.args and getattr(c.args[0], "id", None) == loop_var for c in ast.walk(node)):
                values = list(node.iter.elts)
        out += [(v.lineno, v.value) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                and v.value.split(".")[0] == "iis_study"]
    return out


def _stale_logger_names() -> list[str]:
    """The ``iis_study...`` logger names (:func:`_logger_names`) of the library, the scripts and the tests, and the
    loggers of ``conf/logging.yml``, that name no module or package of ``iis_study``: a logger named after a module
    that moved silences, or captures, nothing."""
    root = SRC.parents[1]
    paths = [*MODULES.values(), *_script_modules().values(), *sorted((root / "tests").rglob("*.py"))]
    found = [(f"{p.relative_to(root)}:{line}", name) for p in paths for line, name in _logger_names(p)]
    loggers = yaml.safe_load((root / "conf" / "logging.yml").read_text()).get("loggers") or {}
    found += [("conf/logging.yml", name) for name in loggers if name.split(".")[0] == "iis_study"]
    assert len(found) > 5, found  # the scan sees them
    return [f"{where}: {name}" for where, name in found if name not in MODULES]


def test_logger_names_name_existing_modules():
    assert not _stale_logger_names(), "logger names of no module (moved?):\n" + "\n".join(_stale_logger_names())


# --------------------------------------------------------------------------- core's stage packages

CORE = SRC / "core"
MAX_FLAT_CORE_MODULES = 10
STAGES = tuple(sorted(p.parent.name for p in CORE.glob("*/__init__.py")))  # every package of core/ is a stage
DOCUMENTED_STAGES = ("representations", "concepts", "heads", "solvers", "scoring", "finetune", "reporting")
BASE = ("iis_study.core.params", "iis_study.core.device", "iis_study.core.data")  # what every stage may use
# core's flat modules above the stages: the library call (core/api.py) runs the stages; no stage imports it
FACADES = tuple(m for m in MODULES if m.count(".") == 2 and m.startswith("iis_study.core.") and m not in BASE
                and m.split(".")[2] not in STAGES)
PLUMBING = tuple(m for m in MODULES if not m.startswith(("iis_study.core", "iis_study.pipelines")) and m != "iis_study")


def test_core_has_at_most_10_flat_modules():
    """``core/`` is its stage packages; only the modules every stage uses stay flat."""
    flat = sorted(p.name for p in CORE.glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= MAX_FLAT_CORE_MODULES, f"{len(flat)} modules flat in core/ (at most {MAX_FLAT_CORE_MODULES}): {flat}"
    assert set(STAGES) >= set(DOCUMENTED_STAGES), STAGES  # the stages are found (docs/architecture.md lists them)
    assert FACADES == ("iis_study.core.api",), FACADES


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["iis_study", "core"] and parts[2] in STAGES else None


def _upward_arrows(graph: dict[str, dict[str, list[int]]]) -> list[str]:
    """Imports that run back up the building: core importing a pipeline or the plumbing, a pipeline importing the
    plumbing, a stage importing core's facade (``core/api.py``), the base modules (params, device, data) importing
    a stage or the facade."""
    bad = []
    for a, targets in graph.items():
        for b, lines in targets.items():
            where = f"{MODULES[a].relative_to(SRC)}:{lines[0]} imports {b}"
            if a.startswith("iis_study.core") and not b.startswith("iis_study.core"):
                bad.append(where)
            elif a.startswith("iis_study.pipelines") and b in PLUMBING:
                bad.append(where)
            elif (_stage(a) or a in BASE) and b in FACADES:
                bad.append(where)
            elif a in BASE and _stage(b):
                bad.append(where)
    return bad


def _stage_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Cycles between core's stage packages (each package one node: ``concepts -> heads -> concepts``)."""
    stages: dict[str, dict[str, list[int]]] = {s: {} for s in STAGES}
    for a, targets in graph.items():
        for b, lines in targets.items():
            sa, sb = _stage(a), _stage(b)
            if sa and sb and sa != sb:
                stages[sa].setdefault(sb, []).extend(lines)
    return _cycles(stages)


def test_no_arrow_runs_back_up():
    graph = _import_graph()
    bad = _upward_arrows(graph)
    assert not bad, "imports against the direction plumbing -> pipelines -> core:\n" + "\n".join(bad)
    cycles = _stage_cycles(graph)
    detail = [" -> ".join(c) + ": " + "; ".join(
        f"{a} imports {b} ({', '.join(sorted(m.split('.', 2)[2] for m, t in graph.items() if _stage(m) == a for n in t if _stage(n) == b))})"
        for a, b in zip(c, c[1:])) for c in cycles]
    assert not cycles, "cycles between core's stage packages:\n" + "\n".join(detail)


def _script_modules() -> dict[str, Path]:
    """``scripts/*.py`` by module name (``bench_estimators``): scripts import each other with ``scripts/`` on ``sys.path``."""
    return {p.stem: p for p in sorted(SCRIPTS.glob("*.py"))}


def _private_imports(path: Path) -> list[str]:
    """``module:line imports name from other`` for every underscore name taken from another project module: by
    ``from other import _name`` or as ``other._name`` where ``other`` names a project module. A script
    (``scripts/*.py``) counts the library's modules and the other scripts as project modules."""
    script = path.parent == SCRIPTS
    scripts = _script_modules() if script else {}
    module = path.stem if script else _module_name(path)
    package = [] if script else module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    shown = path.relative_to(SCRIPTS.parent if script else SRC)
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    bad = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _project_module(base) is None and base not in scripts:
                continue  # third-party privates are theirs to keep
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif private(a.name):
                    bad.append(f"{shown}:{node.lineno} imports {a.name} from {base}")
        elif isinstance(node, ast.Import):
            aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in scripts}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and private(node.attr) and aliases[node.value.id] != module):
            bad.append(f"{shown}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def test_no_private_name_crosses_a_module():
    """A name another module uses is public (no underscore); tests import private names from where they are
    defined. No package re-exports a private name. Scripts (``scripts/*.py``) take no private name from the
    library or from another script."""
    paths = [*MODULES.values(), *_script_modules().values()]
    assert len(paths) > len(MODULES) + 10, "scripts/ not found"
    bad = [b for path in paths for b in _private_imports(path)]
    assert not bad, "private names used across modules (drop the underscore):\n" + "\n".join(bad)


def test_the_structure_checks_see_what_they_forbid(tmp_path, monkeypatch):
    """Each check fails on the thing it forbids (else an empty check would pass)."""
    src = tmp_path / "iis_study" / "core" / "scoring" / "bad.py"
    src.parent.mkdir(parents=True)
    src.write_text("from ..heads.seeds import _private\nfrom ..heads import seeds\nseeds._other\n")
    monkeypatch.setitem(MODULES, "iis_study.core.scoring.bad", src)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "iis_study")
    found = _private_imports(src)
    assert len(found) == 2 and "_private" in found[0] and "seeds._other" in found[1], found
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "helper.py").write_text("def _rows(): ...\n")
    script = scripts / "bench_bad.py"
    script.write_text("import helper\nfrom helper import _rows\nfrom iis_study.core.heads.seeds import _private\n"
                      "from iis_study.core.heads import seeds\nimport numpy as np\nhelper._rows, seeds._other, np._x\n")
    monkeypatch.setattr(sys.modules[__name__], "SCRIPTS", scripts)
    found = _private_imports(script)
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports _rows from helper", "imports _private from iis_study.core.heads.seeds", "uses helper._rows",
        "uses seeds._other"], found
    graph = {"iis_study.core.heads.a": {"iis_study.core.concepts.b": [1]},
             "iis_study.core.concepts.b": {"iis_study.core.heads.a": [2], "iis_study.hooks": [3]},
             "iis_study.core.params": {"iis_study.core.scoring.c": [4]},
             "iis_study.core.scoring.c": {"iis_study.core.api": [5]}}
    for name in graph:
        monkeypatch.setitem(MODULES, name, src)
    assert _stage_cycles(graph) == [["concepts", "heads", "concepts"]]
    found = _upward_arrows(graph)
    assert len(found) == 3 and found[2].endswith("imports iis_study.core.api"), found  # core -> plumbing; params -> a stage; a stage -> api
    # a new package in core/ is a stage: its cycles are found
    monkeypatch.setattr(sys.modules[__name__], "STAGES", (*STAGES, "newstage"))
    graph = {"iis_study.core.newstage.a": {"iis_study.core.heads.b": [1]}, "iis_study.core.heads.b": {"iis_study.core.newstage": [2]}}
    assert _stage_cycles(graph) == [["heads", "newstage", "heads"]]
