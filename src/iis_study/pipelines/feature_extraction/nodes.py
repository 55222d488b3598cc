"""Nodes of the feature extraction pipeline (one namespaced copy per backbone)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from iis_study.core.backbones import BackboneSpec, build
from iis_study.core.data import SPLITS, DatasetSpec, check_class_coverage, load_dataset
from iis_study.core.features import cached_features, extract_sharded_cached, split_features

logger = logging.getLogger(__name__)


def resolve_device(requested: str = "auto") -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"extraction.device = {requested!r}, but this machine has no CUDA GPU; use 'cpu' or 'auto'")
    return requested


def extract_features(
    splits: pd.DataFrame, dataset: dict[str, Any], backbone: dict[str, Any], extraction: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pooled penultimate features of every train/val/test image, from the cache when present.

    Returns:
        ``features``: ``{"<split>.x": (N, D) float32, "<split>.y": (N,) int64}`` for each split
        (with ``extraction.storage: sharded`` each ``.x`` is a
        :class:`~iis_study.core.store.ShardedArray` on disk instead of a tensor);
        ``feature_info``: the cache key, weights fingerprint, preprocessing and sizes.
    """
    spec = BackboneSpec.from_params(backbone.get("name", backbone.get("model", "backbone")), _strip_name(backbone))
    images = load_dataset(DatasetSpec.from_params(dataset))
    sharded = extraction.get("storage", "memory") == "sharded"
    device = resolve_device(extraction.get("device", "auto"))
    common = {
        "cache_dir": extraction.get("cache_dir", "data/04_feature/cache"),
        "batch_size": int(extraction.get("batch_size", 128)),
        "num_workers": extraction.get("num_workers"),
        "progress": bool(extraction.get("progress", True)),
        "on_bad_image": dataset.get("on_bad_image", "error"),
    }
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
                storage_dtype=extraction.get("storage_dtype", "float32"),
                shard_rows=int(extraction.get("shard_rows", 16384)),
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
        "storage": extraction.get("storage", "memory"),
        "num_classes": int(np.unique(splits["label"]).size),
    }
    out["__metadata__"] = {"cache_key": key, "model": spec.model}
    logger.info("%s: %d-d features, cache key %s", spec.model, rep.dim, key)
    return out, info


def _strip_name(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "name"}
