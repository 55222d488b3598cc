"""Features of a study's images for one representation: the body of the feature extraction node.

The images of the split table are extracted once (from the cache when present), cut back into
train / val / test, and described by a ``feature_info`` record (cache key, weights fingerprint,
preprocessing, sizes). See :mod:`iis_study.core.representations.features` for the cache itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from .backbones import BackboneParams, build
from .blocks import ExtractionParams, backbone_spec
from ..data import SPLITS, ImageSet, array_image_set, check_class_coverage
from ..device import resolve_device
from .features import (
    Embeddings,
    FeatureCache,
    FeatureSet,
    SplitFeatures,
    cached_features,
    extract_sharded_cached,
    split_features,
)

logger = logging.getLogger(__name__)


def extraction_kwargs(extraction: ExtractionParams, cache: FeatureCache, on_bad_image: str = "error") -> dict[str, Any]:
    """The cache and loader settings shared by every extraction call."""
    return {
        "cache_dir": cache.root,
        "batch_size": extraction.batch_size,
        "num_workers": extraction.num_workers,
        "progress": extraction.progress,
        "on_bad_image": on_bad_image,
    }


def extract_split_features(
    spec: BackboneParams | Mapping[str, Any], images: ImageSet, splits: pd.DataFrame, cache: FeatureCache,
    extraction: ExtractionParams,
) -> tuple[FeatureSet, dict[str, Any]]:
    """Pooled features of every train/val/test image of the split table, from the cache when present.
    ``spec``: the representation, or its entry of the expanded ``backbones`` block.

    Returns:
        ``features``: the :class:`~iis_study.core.representations.features.FeatureSet` (with ``extraction.storage:
        sharded`` each split's ``x`` is a :class:`~iis_study.core.representations.store.ShardedArray` on disk);
        ``feature_info``: the cache key, weights fingerprint, preprocessing and sizes.
    """
    spec = spec if isinstance(spec, BackboneParams) else backbone_spec(spec)
    extraction = ExtractionParams.from_params(extraction)
    sharded = extraction.sharded
    device = resolve_device(extraction.device, "extraction.device")
    common = extraction_kwargs(extraction, cache, images.on_bad_image)
    split_names = splits["split"].to_numpy()
    dataset_index = splits["index"].to_numpy()
    all_images = images.subset(dataset_index)
    labels = torch.as_tensor(splits["label"].to_numpy(), dtype=torch.int64)
    out: dict[str, Any] = {}
    oks = []
    if sharded:
        rep = build(spec, device=device)
        keys = []
        for name in SPLITS:
            rows = np.flatnonzero(split_names == name)
            x, y, ok, key = extract_sharded_cached(
                rep,
                images.subset(dataset_index[rows]),
                storage_dtype=extraction.storage_dtype,
                shard_rows=extraction.shard_rows,
                desc=f"{spec.model} ({spec.weights}) {name}",
                **common,
            )
            if not torch.equal(y, labels[rows]):
                raise ValueError("extracted labels do not match the split table: the dataset changed under the cache")
            out[f"{name}.x"] = x if bool(ok.all()) else x.select(ok)
            out[f"{name}.y"] = y[ok].contiguous()
            out[f"{name}.index"] = torch.as_tensor(dataset_index[rows], dtype=torch.int64)[ok].contiguous()
            oks.append(ok)
            keys.append(key)
        key = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
    else:
        feats, key, rep = cached_features(
            spec, all_images, device, desc=f"{spec.model} ({spec.weights})", **common
        )
        if not torch.equal(feats.y, labels):
            raise ValueError("extracted labels do not match the split table: the dataset changed under the cache")
        for name, f in split_features(feats, split_names, SPLITS).items():
            ok = f.ok.bool()
            out[f"{name}.x"] = f.x[ok].contiguous()
            out[f"{name}.y"] = f.y[ok].contiguous()
            # dataset indices of the images kept (skipped unreadable files are left out everywhere downstream)
            out[f"{name}.index"] = torch.as_tensor(dataset_index[split_names == name], dtype=torch.int64)[ok].contiguous()
        oks.append(feats.ok.bool())
    keep = torch.cat(oks)
    if not bool(keep.all()):
        logger.warning("%d unreadable image(s) skipped (dataset.on_bad_image = skip)", int((~keep).sum()))
    if not bool(keep.all()):
        check_class_coverage({s: out[f"{s}.y"].numpy() for s in SPLITS}, images.classes)
    info = {
        "model": spec.model,
        "weights": spec.weights,
        "dataset_name": images.name,
        "dataset_fingerprint": all_images.fingerprint(),  # memoised: the in-memory cache key hashed it already
        "cache_key": key,
        "weights_fingerprint": rep.weights_fingerprint,
        "dim": rep.dim,
        **rep.preprocess_config(),
        **{f"n_{s}": int(out[f"{s}.y"].numel()) for s in SPLITS},
        "n_skipped": int((~keep).sum()),
        "storage": extraction.storage,
        "num_classes": int(np.unique(splits["label"]).size),
    }
    logger.info("%s: %d-d features, cache key %s", spec.model, rep.dim, key)
    parts = {name: SplitFeatures(out[f"{name}.x"], out[f"{name}.y"], out[f"{name}.index"]) for name in SPLITS}
    return FeatureSet(**parts, cache_key=key, model=spec.model), info


def embed_elements(
    spec: BackboneParams | Mapping[str, Any], element_images: Any, cache: FeatureCache,
    extraction: ExtractionParams,
) -> Embeddings:
    """Embeddings of the concept elements by the representation (the same code and cache as the features).
    ``spec``: the representation, or its entry of the expanded ``backbones`` block; ``element_images``: the
    elements' images as an array, or any object holding them as ``.images`` (the concepts' ``Elements``)."""
    spec = spec if isinstance(spec, BackboneParams) else backbone_spec(spec)
    element_images = getattr(element_images, "images", element_images)  # Elements or their images
    extraction = ExtractionParams.from_params(extraction)
    feats, key, _ = cached_features(
        spec,
        array_image_set(element_images, name="concept_elements"),
        resolve_device(extraction.device, "extraction.device"),
        desc=f"{spec.model} concept elements",
        **{k: v for k, v in extraction_kwargs(extraction, cache).items() if k != "on_bad_image"},
    )
    return Embeddings(x=feats.x, cache_key=key, model=spec.model)
