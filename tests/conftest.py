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
