"""Nodes of the concept acquisition pipeline.

Dataset level: pick source images and cut them into concept elements (patches, segments).
Backbone level: embed the elements with the backbone (the feature extraction code and cache),
then turn the embeddings into a concept space for each concept type (METHOD §5).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from iis_study.core import concepts as C
from iis_study.core.backbones import BackboneSpec
from iis_study.core.data import BadImageError, DatasetSpec, array_image_set, load_dataset
from iis_study.core.features import cached_features
from iis_study.pipelines.feature_extraction.nodes import _strip_name, resolve_device

logger = logging.getLogger(__name__)


def select_concept_sources(splits: pd.DataFrame, concepts: dict[str, Any]) -> pd.DataFrame:
    """A seeded sample of ``images_per_class`` train images per class, the concept sources."""
    per_class = int(concepts.get("images_per_class", 10))
    if per_class < 1:
        raise ValueError(f"concepts.images_per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(int(concepts.get("seed", 0)))
    train = splits[splits["split"] == "train"]
    picked = []
    for _, group in train.groupby("label", sort=True):
        n = min(per_class, len(group))
        picked.append(group.iloc[np.sort(rng.choice(len(group), size=n, replace=False))])
    out = pd.concat(picked).reset_index(drop=True)
    logger.info("%d concept source images (%d per class)", len(out), per_class)
    return out


def build_concept_elements(sources: pd.DataFrame, dataset: dict[str, Any], concepts: dict[str, Any]):
    """Patches and/or SLIC segments of every source image, with provenance for display."""
    images = load_dataset(DatasetSpec.from_params(dataset))
    arrays, ids, skipped = [], [], 0
    for i in sources["index"]:
        try:
            arrays.append(images.load(int(i)))
            ids.append(int(i))
        except BadImageError:
            if dataset.get("on_bad_image", "error") != "skip":
                raise
            skipped += 1
    if skipped:
        logger.warning("%d unreadable concept source image(s) skipped (dataset.on_bad_image = skip)", skipped)
    size = int(concepts.get("element_size", 64))
    kinds = concepts.get("element_kinds", ["patches", "segments"])
    parts = []
    if "patches" in kinds:
        parts.append(C.patch_elements(arrays, ids, grid=int(concepts.get("patches", {}).get("grid", 4)), size=size))
    if "segments" in kinds:
        seg = dict(concepts.get("segments", {}))
        if "n_segments" in seg:
            seg["n_segments"] = tuple(seg["n_segments"])
        parts.append(C.segment_elements(arrays, ids, size=size, seed=int(concepts.get("seed", 0)), **seg))
    unknown = set(kinds) - {"patches", "segments"}
    if unknown or not parts:
        raise ValueError(f"concepts.element_kinds must be a non-empty subset of [patches, segments], got {kinds}")
    elements = C.Elements.concat(parts)
    logger.info("%d concept elements (%s)", len(elements), elements.meta["kind"].value_counts().to_dict())
    return elements


def embed_concept_elements(elements, backbone: dict[str, Any], extraction: dict[str, Any]) -> dict[str, Any]:
    """Embeddings of the concept elements by the backbone (same code and cache as the features)."""
    spec = BackboneSpec.from_params(backbone.get("model", "backbone"), _strip_name(backbone))
    feats, key, _ = cached_features(
        spec,
        array_image_set(elements.images, name="concept_elements"),
        resolve_device(extraction.get("device", "auto")),
        cache_dir=extraction.get("cache_dir", "data/04_feature/cache"),
        batch_size=int(extraction.get("batch_size", 128)),
        num_workers=extraction.get("num_workers"),
        progress=bool(extraction.get("progress", True)),
        desc=f"{spec.model} concept elements",
    )
    return {"x": feats.x, "__metadata__": {"cache_key": key, "model": spec.model}}


def _m(concepts: dict[str, Any]) -> int:
    m = concepts.get("m", 200)
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"concepts.m must be a positive integer, got {m!r}")
    return m


def _usable(element_embeddings: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Element embeddings with a direction (a blank patch can embed to the zero vector, which no
    L2 normalisation can turn into a concept), and their element ids."""
    emb = element_embeddings["x"]
    ids = np.flatnonzero((emb.norm(dim=1) > 1e-6).numpy())
    if len(ids) < len(emb):
        logger.info("%d of %d concept elements embed to the zero vector and are left out", len(emb) - len(ids), len(emb))
    return emb[torch.as_tensor(ids)], ids


def prototype_concepts(element_embeddings: dict[str, Any], concepts: dict[str, Any]) -> dict[str, Any]:
    """METHOD §5.1: M element embeddings (a seeded random sample), L2-normalised."""
    emb, ids = _usable(element_embeddings)
    m = _m(concepts)
    C.check_m(m, len(emb), "prototype")
    seed = int(concepts.get("seed", 0))
    idx = C.prototype_indices(len(emb), m, seed)
    vectors = C.prototype_vectors(emb, m, seed)
    return _space("vectors", "prototype", vectors=vectors, element_ids=torch.as_tensor(ids[idx], dtype=torch.int64))


def cluster_concepts(element_embeddings: dict[str, Any], concepts: dict[str, Any]) -> dict[str, Any]:
    """METHOD §5.2: KMeans centroids of up to ``cluster_max_elements`` element embeddings."""
    emb, ids = _usable(element_embeddings)
    m = _m(concepts)
    C.check_m(m, len(emb), "cluster")
    vectors, representatives = C.cluster_vectors(
        emb, m, seed=int(concepts.get("seed", 0)), max_elements=int(concepts.get("cluster_max_elements", 20000))
    )
    return _space(
        "vectors", "cluster", vectors=vectors, element_ids=torch.as_tensor(ids[np.asarray(representatives)], dtype=torch.int64)
    )


def end_to_end_concepts(element_embeddings: dict[str, Any], concepts: dict[str, Any]) -> dict[str, Any]:
    """METHOD §5.3: the element embeddings over which the assignment is learned with the head."""
    emb, usable = _usable(element_embeddings)
    m = _m(concepts)
    C.check_m(m, len(emb), "end_to_end")
    elements, picked = C.end_to_end_elements(
        emb, max_elements=int(concepts.get("end_to_end_max_elements", 2500)), seed=int(concepts.get("seed", 0))
    )
    return _space(
        "end_to_end",
        "end_to_end",
        elements=elements,
        element_ids=torch.as_tensor(usable[np.asarray(picked)], dtype=torch.int64),
        n_concepts=m,
    )


def textual_concepts(
    features: dict[str, Any], splits: pd.DataFrame, dataset: dict[str, Any], concepts: dict[str, Any]
) -> dict[str, Any]:
    """METHOD §5.4: CLIP-scored concept words and the learned projection onto them."""
    from iis_study.core import textual as T

    cfg = dict(concepts.get("textual", {}))
    if cfg.get("tiny_random_clip"):
        bundle = T.tiny_clip(seed=int(concepts.get("seed", 0)))
        logger.warning("textual concepts use a tiny RANDOM CLIP (concepts.textual.tiny_random_clip): a test setting")
    else:
        bundle = T.load_clip(
            cfg.get("model", "ViT-B-16"), pretrained=cfg.get("pretrained", "openai"), checkpoint=cfg.get("checkpoint")
        )
    images = load_dataset(DatasetSpec.from_params(dataset))
    max_images = int(cfg.get("max_images", 2000))
    rng = np.random.default_rng(int(concepts.get("seed", 0)))
    parts = {}
    for split in ("train", "val"):
        if f"{split}.index" in features:  # dataset indices of the feature rows (skipped images left out)
            index = features[f"{split}.index"].numpy()
        else:
            index = splits.loc[splits["split"] == split, "index"].to_numpy()
        pick = np.sort(rng.choice(len(index), size=min(max_images, len(index)), replace=False))
        parts[split] = (index[pick], pick)
    words = T.read_words(cfg.get("words", "digits"))
    result = T.textual_concepts(
        bundle,
        [images.load(int(i)) for i in parts["train"][0]],
        [images.load(int(i)) for i in parts["val"][0]],
        features["train.x"][torch.as_tensor(parts["train"][1])],
        features["val.x"][torch.as_tensor(parts["val"][1])],
        words,
        top5_threshold=float(cfg.get("top5_threshold", 0.25)),
        sim_threshold=float(cfg.get("similarity_threshold", 0.45)),
    )
    return _space(
        "projection",
        "textual",
        projection=result.projection,
        mean=result.mean,
        std=result.std,
        words=json.dumps(list(result.words)),
    )


def _space(kind: str, concept_type: str, **tensors: Any) -> dict[str, Any]:
    meta = {"kind": kind, "concept_type": concept_type}
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().float().contiguous() if k != "element_ids" else v.contiguous()
        elif v is not None:
            meta[k] = str(v)
    out["__metadata__"] = meta
    return out
