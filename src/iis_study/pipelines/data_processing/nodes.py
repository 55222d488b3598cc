"""Nodes of the data processing pipeline: open the dataset, split it."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from iis_study.core.data import DatasetSpec, load_dataset, stratified_split

logger = logging.getLogger(__name__)


def make_splits(dataset: dict[str, Any], splits: dict[str, Any]) -> pd.DataFrame:
    """Deterministic stratified train/val/test split of the dataset.

    Args:
        dataset: the ``dataset`` parameter block (kind, root, ...).
        splits: ``fractions`` (train, val, test), ``seed`` and optional ``max_per_class``.

    Returns:
        One row per image used: ``index`` into the dataset, ``label``, ``class_name``, ``item``
        (file path or array index) and ``split``.
    """
    images = load_dataset(DatasetSpec.from_params(dataset))
    table = stratified_split(
        images.labels,
        fractions=splits.get("fractions", (0.6, 0.2, 0.2)),
        seed=int(splits.get("seed", 0)),
        max_per_class=splits.get("max_per_class"),
        class_names=images.classes,
    )
    table["class_name"] = [images.classes[c] for c in table["label"]]
    table["item"] = [images.items[i] for i in table["index"]]
    counts = table.groupby("split").size().to_dict()
    logger.info(
        "%s: %d classes, %d images used (%s)",
        images.name,
        len(images.classes),
        len(table),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )
    return table[["index", "label", "class_name", "item", "split"]]
