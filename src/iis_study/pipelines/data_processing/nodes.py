"""Nodes of the data processing pipeline: split the images."""

from __future__ import annotations

import pandas as pd

from iis_study.core.data import SplitParams
from iis_study.core.data import ImageSet, split_table


def make_splits(images: ImageSet, splits: SplitParams) -> pd.DataFrame:
    """Deterministic stratified train/val/test split of the images.

    Args:
        images: the ``images`` catalog entry (the dataset of ``globals.yml``).
        splits: ``fractions`` (train, val, test), ``seed`` and optional ``max_per_class``.

    Returns:
        One row per image used: ``index`` into the dataset, ``label``, ``class_name``, ``item``
        (file path or array index) and ``split``.
    """
    return split_table(images, fractions=splits.fractions, seed=splits.seed, max_per_class=splits.max_per_class)
