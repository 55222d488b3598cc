"""Shared fixtures: tiny datasets and a fast backbone."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")


@pytest.fixture
def tiny_imagefolder(tmp_path):
    """root/<class>/*.png with 3 classes x 6 images of distinct colours."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "ship"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(6):
            arr = np.full((20, 24, 3), 40 * c + 30, dtype=np.uint8)
            arr += rng.integers(0, 20, size=arr.shape, dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


# The session fixture every whole-study test shares (tests/pipelines/conftest.py): the modules that use it are
# scheduled as one unit under pytest-xdist, so the tiny study runs once.
SHARED_STUDY = "tiny_run"


def pytest_collection_modifyitems(config, items):
    """Scheduling units for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): each test module is one
    unit, so a module-scoped fixture (a Kedro run, a fitted backbone) is built once; every module that uses the
    session's tiny study (``tiny_run``) joins one unit, so that study is run by one worker only. Without xdist the
    marks do nothing."""
    shared = {item.path for item in items if SHARED_STUDY in getattr(item, "fixturenames", ())}
    root = config.rootpath
    for item in items:
        unit = SHARED_STUDY if item.path in shared else str(item.path.relative_to(root))
        item.add_marker(pytest.mark.xdist_group(unit))
