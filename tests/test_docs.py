"""The documentation's runnable examples run, and no doc links outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_library_example_runs_as_written(capsys):
    (block,) = _python_blocks(ROOT / "docs" / "library.md")
    exec(compile(block, "docs/library.md", "exec"), {})
    out = capsys.readouterr().out
    iis = float(re.search(r"IIS (\d\.\d+)", out).group(1))
    probe = float(re.search(r"probe accuracy (\d\.\d+)", out).group(1))
    assert 0.9 < probe <= 1.0 and 0.3 < iis < 0.98
    assert "certified:" in out


def test_no_link_points_outside_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "conf" / "README.md"]
    bad = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("../") or target.startswith("/"):
                bad.append(f"{doc.name}: {target}")
            elif not target.startswith("#"):
                assert (doc.parent / target.split("#")[0]).exists(), f"{doc.name}: broken link {target}"
    assert not bad, bad
