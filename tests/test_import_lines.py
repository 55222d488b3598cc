"""Every ``from iis_study... import ...`` line written in tests/ and scripts/ resolves -- also the ones inside
strings (code a test runs in a child process), which the module-level structure checks do not parse: after the
stage packages moved (issue 33) such a line in a child's source failed only when the slow test ran."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^[ \t]*from (iis_study[\w.]*) import ([\w, ]+)$", re.M)


def unresolved(text: str, where: str) -> list[str]:
    """The import lines of ``text`` whose module or name does not exist."""
    bad = []
    for match in LINE.finditer(text):
        module_name = match.group(1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            bad.append(f"{where}: {match.group(0).strip()} ({err})")
            continue
        for name in (part.split(" as ")[0].strip() for part in match.group(2).split(",")):
            if not name or hasattr(module, name):
                continue
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                bad.append(f"{where}: {match.group(0).strip()} (no {name!r} in {module_name})")
    return bad


def test_every_import_line_in_tests_and_scripts_resolves():
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    bad = [line for path in files for line in unresolved(path.read_text(), str(path.relative_to(ROOT)))]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_stale_line_inside_a_string():
    child = 'CHILD = r"""\nimport sys\nfrom iis_study.core import features as F\n"""\n'
    assert unresolved(child, "example")
    assert not unresolved("from iis_study.core.representations import features as F\n", "example")
