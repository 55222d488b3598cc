"""scripts/break_promises.py stays usable: every breakage's code is in its file exactly once.

The script breaks each promise on purpose and reports which tests catch it (docs/testing.md). When the
code it edits changes, a breakage whose text is gone stops the script; this test says so at once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _breakages():
    spec = importlib.util.spec_from_file_location("break_promises", ROOT / "scripts" / "break_promises.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules.setdefault("break_promises", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.BREAKAGES


@pytest.mark.parametrize("breakage", _breakages(), ids=lambda b: b.name)
def test_every_breakage_finds_its_code_exactly_once(breakage):
    text = (ROOT / breakage.file).read_text()
    assert text.count(breakage.old) == 1, f"{breakage.name}: {breakage.old!r} in {breakage.file}"
    assert breakage.old != breakage.new
    for test in breakage.tests:
        assert (ROOT / test.split("::")[0]).is_file(), test
