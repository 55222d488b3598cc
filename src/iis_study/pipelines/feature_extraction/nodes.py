"""Nodes of the feature extraction pipeline (one namespaced copy per representation)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core.representations.blocks import ExtractionParams
from iis_study.core.data import ImageSet
from iis_study.core.representations.extraction import extract_split_features
from iis_study.core.representations.features import FeatureCache, FeatureSet


def extract_features(
    splits: pd.DataFrame,
    images: ImageSet,
    feature_cache: FeatureCache,
    backbone: dict[str, Any],
    extraction: ExtractionParams,
) -> tuple[FeatureSet, dict[str, Any]]:
    """Pooled features of every train/val/test image, from the feature cache when present.

    The cache (the ``feature_cache`` catalog entry, keyed by weights, preprocessing and images) is
    shared by every representation and by the concept elements: :class:`~iis_study.core.representations.features.FeatureCache`.

    Returns:
        ``features``: the :class:`~iis_study.core.representations.features.FeatureSet` (train, val, test: ``x``, ``y``,
        ``index``; with ``extraction.storage: sharded`` each ``x`` is on disk);
        ``feature_info``: the cache key, weights fingerprint, preprocessing and sizes.
    """
    return extract_split_features(backbone, images, splits, feature_cache, extraction)
