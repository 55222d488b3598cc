"""The YAML in ``conf/base`` and the typed blocks' defaults agree, or the YAML says why not.

Every default is written once, in its typed block (``core/<stage>/blocks.py``, and ``DatasetParams``, ``SplitParams``,
``SweepParams`` next to their code); ``conf/base/parameters_*.yml`` writes the study's values. A key whose YAML value differs
from its code default must carry, on the line that sets it, a comment containing the word
``default`` that explains the difference -- otherwise one of the two is a stale copy.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from iis_study.core.finetune import FineTuningParams
from iis_study.core.concepts.blocks import ConceptParams
from iis_study.core.scoring.blocks import CorrelationParams, ScoringParams, SpecificationParams, WeightSparsityParams
from iis_study.core.representations.blocks import ExtractionParams
from iis_study.core.reporting.blocks import GalleryParams
from iis_study.core.data import SplitParams
from iis_study.core.data import DatasetParams
from iis_study.core.heads import SweepParams
from iis_study.core.params import Params
from tests.kedro_project import ROOT

CONF = ROOT / "conf" / "base"

# block name -> its typed class (as validation.validate_study reads them)
BLOCKS: dict[str, type[Params]] = {
    "dataset": DatasetParams, "splits": SplitParams, "extraction": ExtractionParams, "concepts": ConceptParams,
    "sweep": SweepParams, "scoring": ScoringParams, "correlation": CorrelationParams, "gallery": GalleryParams,
    "specification": SpecificationParams,
    "fine_tuning": FineTuningParams, "weight_sparsity": WeightSparsityParams,
}
# data, not defaults
SKIPPED = {"backbones", "families"}

_MISSING = object()


def _sources() -> list[tuple[Path, dict[str, Any]]]:
    """(file, its blocks): every parameters_*.yml, and globals.yml for ``dataset``."""
    out = []
    for path in sorted(CONF.glob("parameters_*.yml")):
        blocks = yaml.safe_load(path.read_text()) or {}
        # `dataset: ${globals:dataset}` is an interpolation: the values are in globals.yml
        blocks = {k: v for k, v in blocks.items() if k != "dataset" or isinstance(v, dict)}
        out.append((path, blocks))
    globals_ = yaml.safe_load((CONF / "globals.yml").read_text())
    out.append((CONF / "globals.yml", {"dataset": globals_["dataset"]}))
    return out


def _default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def _line_comment(lines: list[str], path: tuple[str, ...]) -> str | None:
    """The comment on the line that sets ``path`` (block, key, nested key...): the line matching
    ``^\\s*<key>:`` at the block's child indentation, within the block; ``None`` if not found."""
    start, end, indent = 0, len(lines), 0
    for depth, key in enumerate(path):
        if depth:  # the children's indentation: the first content line after the parent's
            children = [ln for ln in lines[start + 1:end] if ln.strip() and not ln.lstrip().startswith("#")]
            if not children:
                return None
            indent = len(children[0]) - len(children[0].lstrip())
        pattern = re.compile(rf"^ {{{indent}}}{re.escape(key)}:")
        found = next((i for i in range(start + (1 if depth else 0), end) if pattern.match(lines[i])), None)
        if found is None:
            return None
        start = found
        # the key's lines end at the next content line indented no deeper than the key
        end = next((j for j in range(found + 1, end) if lines[j].strip() and not lines[j].lstrip().startswith("#")
                    and len(lines[j]) - len(lines[j].lstrip()) <= indent), end)
    line = lines[start]
    return line.split("#", 1)[1] if "#" in line else ""


def _compare(cls: type, values: dict[str, Any], path: tuple[str, ...], out: list[tuple[tuple[str, ...], Any, Any]]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            continue  # unknown keys are the blocks' own tests' business
        default = _default(cls, key)
        if default is _MISSING:
            continue  # required: no code default
        if isinstance(value, dict):
            if isinstance(default, Params):
                _compare(type(default), value, (*path, key), out)
            continue
        if _plain(value) != _plain(default):
            out.append(((*path, key), value, _plain(default)))


def disagreements() -> list[str]:
    """``block.key: yaml=... code=...`` for every difference without a ``default`` comment on its line."""
    unexplained = []
    for path, blocks in _sources():
        lines = path.read_text().splitlines()
        for name, values in blocks.items():
            if name in SKIPPED or not isinstance(values, dict):
                continue
            assert name in BLOCKS, f"{path.name}: block {name!r} has no typed class in this test's BLOCKS"
            found: list[tuple[tuple[str, ...], Any, Any]] = []
            _compare(BLOCKS[name], values, (name,), found)
            for keys, yaml_value, code_value in found:
                comment = _line_comment(lines, keys)
                if comment is None or not re.search(r"\bdefault\b", comment):
                    unexplained.append(f"{'.'.join(keys)}: yaml={yaml_value!r} code={code_value!r} ({path.name})")
    return unexplained


def test_every_yaml_value_is_the_code_default_or_says_why_not():
    bad = disagreements()
    assert not bad, (
        "conf/base values that differ from their code default without a `# ... default ...` comment "
        "saying why:\n  " + "\n  ".join(bad)
    )


def test_every_block_is_checked():
    """A new block in conf/base must be added to BLOCKS (or SKIPPED), so that it is compared too."""
    names = {n for _, blocks in _sources() for n in blocks}
    assert names - SKIPPED <= set(BLOCKS), sorted(names - SKIPPED - set(BLOCKS))
    assert set(BLOCKS) <= names | {"dataset"}


# --------------------------------------------------------------------------- library functions' defaults

# a library function whose keyword defaults are a block's: parameter -> (block class, field)
from iis_study.core.concepts import elements as _elements  # noqa: E402
from iis_study.core.concepts import vectors as _vectors  # noqa: E402
from iis_study.core.concepts.blocks import PatchParams, SegmentParams  # noqa: E402

_SEGMENT_FIELDS = {f.name: (SegmentParams, f.name) for f in dataclasses.fields(SegmentParams)}
FUNCTION_DEFAULTS = {
    _elements.segment_elements: {**_SEGMENT_FIELDS, "size": (ConceptParams, "element_size")},
    _elements.select_segments: _SEGMENT_FIELDS,
    _elements.patch_elements: {"grid": (PatchParams, "grid"), "size": (ConceptParams, "element_size")},
    _vectors.cluster_vectors: {"max_elements": (ConceptParams, "cluster_max_elements")},
}


def _function_defaults(fn) -> dict[str, ast.expr]:
    """Parameter -> the default's expression as written in ``fn``'s source."""
    import inspect
    import textwrap

    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    args = node.args
    positional = args.posonlyargs + args.args
    out = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    out |= {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    return out


def function_default_copies() -> list[str]:
    """``function(parameter)`` for every library default that is not read from its block (written a second time,
    or a different value)."""
    import inspect

    bad = []
    for fn, params in FUNCTION_DEFAULTS.items():
        written = _function_defaults(fn)
        signature = inspect.signature(fn).parameters
        for name, (cls, field) in params.items():
            if name not in signature:
                continue
            expr = written.get(name)
            source = ast.unparse(expr) if expr is not None else "(none)"
            if source != f"{cls.__name__}.{field}" or _plain(signature[name].default) != _plain(_default(cls, field)):
                bad.append(f"{fn.__module__}.{fn.__name__}({name} = {source}): the default is {cls.__name__}.{field}")
    return bad


def test_library_defaults_are_read_from_their_block():
    """Segmentation's (and the patches' and clusters') defaults are written once, in ``concepts``' blocks: the
    library functions read them (``n_segments=SegmentParams.n_segments``), they do not copy them."""
    bad = function_default_copies()
    assert not bad, "library defaults written a second time:\n  " + "\n  ".join(bad)
