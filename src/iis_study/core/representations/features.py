"""Batched feature extraction with a content-addressed cache.

``extract`` runs the frozen backbone over an :class:`~iis_study.core.data.ImageSet` with a
``DataLoader`` whose workers decode and resize images (uint8) while the main process runs the
model; ``extract_cached`` keys the result on a hash of the backbone's weights, its preprocessing
and the images, and reuses a stored result without any forward pass.

Files are safetensors (float32 features, int64 labels), written to a temporary name and then
renamed, so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .backbones import BackboneParams, Representation, build, build_layers
from ..data import BadImageError, ImageSet
from .store import ShardedArray, ShardWriter, atomic_path, atomic_save_npy, check_storage

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class Resized(Dataset):
    """Decodes image ``i`` and resizes it to ``size`` x ``size``; returns a uint8 CHW tensor."""

    def __init__(self, images: ImageSet, size: int, interpolation: str, on_bad_image: str = "error"):
        self.images = images
        self.size = size
        self.resample = _INTERPOLATION.get(interpolation, Image.BICUBIC)
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            arr = self.images.load(i)
        except BadImageError:
            if self.on_bad_image != "skip":
                raise
            logger.warning("skipping unreadable image %s", self.images.items[i])
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        if arr.shape[0] != self.size or arr.shape[1] != self.size:
            arr = np.asarray(Image.fromarray(arr).resize((self.size, self.size), self.resample))
        return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1), True


@dataclass
class Features:
    """Features of one set of images: ``x`` (N, D) float32, ``y`` (N,) int64, ``ok`` (N,) bool."""

    x: torch.Tensor
    y: torch.Tensor
    ok: torch.Tensor


@dataclass(frozen=True)
class FeatureCache:
    """The feature cache: one folder shared by every representation, run and environment.

    An entry holds the features of one image set under one representation, named by
    :func:`cache_key` (a hash of the model, its weights' fingerprint, preprocessing and resolution,
    layer and pooling, and the images' fingerprint): equal key, equal features. Layout::

        <root>/<key>.safetensors              in-memory storage: x (N, D) float32, y, ok + metadata
        <root>/<key>.<dtype>.shards/          sharded storage: .npy shards, manifest.json, ok.npy

    Entries are written to a temporary name and renamed, so an interrupted run leaves none half
    written; an unreadable entry is recomputed, never trusted. The study's images and the concept
    elements of every representation share it; a family's layers at one resolution are cached
    together from one forward pass. Deleting the folder only costs the extraction time. The
    ``feature_cache`` catalog entry (catalog.yml) gives its location.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass
class SplitFeatures:
    """One split's features: ``x`` (N, D) float32 (a tensor, or a :class:`~iis_study.core.representations.store.ShardedArray`
    on disk with ``extraction.storage: sharded``), ``y`` (N,) int64 labels, ``index`` (N,) int64 dataset
    indices of the rows (unreadable images skipped with ``on_bad_image: skip`` are left out)."""

    x: Any
    y: torch.Tensor
    index: torch.Tensor


@dataclass
class FeatureSet:
    """The features of the study's images for one representation, by split: what the
    ``{backbone}.features`` catalog entry stores (one safetensors file, shards hard-linked beside it)."""

    train: SplitFeatures
    val: SplitFeatures
    test: SplitFeatures
    cache_key: str = ""
    model: str = ""

    def split(self, name: str) -> SplitFeatures:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in ("train", "val", "test"):
            raise KeyError(f"no split {name!r}: expected train, val or test")
        return getattr(self, name)

    def to_tensors(self) -> dict[str, Any]:
        """The stored form: ``<split>.x`` / ``.y`` / ``.index`` and string metadata."""
        out: dict[str, Any] = {}
        for name in ("train", "val", "test"):
            part = self.split(name)
            out.update({f"{name}.x": part.x, f"{name}.y": part.y, f"{name}.index": part.index})
        out["__metadata__"] = {"cache_key": self.cache_key, "model": self.model}
        return out

    @classmethod
    def from_tensors(cls, data: dict[str, Any]) -> FeatureSet:
        """Back from :meth:`to_tensors`."""
        missing = [f"{s}.{k}" for s in ("train", "val", "test") for k in ("x", "y", "index") if f"{s}.{k}" not in data]
        if missing:
            raise ValueError(f"stored features lack {missing}: written by an older version; re-run feature_extraction")
        meta = data.get("__metadata__") or {}
        parts = {s: SplitFeatures(data[f"{s}.x"], data[f"{s}.y"], data[f"{s}.index"]) for s in ("train", "val", "test")}
        return cls(**parts, cache_key=str(meta.get("cache_key", "")), model=str(meta.get("model", "")))


@dataclass
class Embeddings:
    """Embeddings of a set of images (the concept elements) by one representation: ``x`` (E, D) float32;
    what the ``{backbone}.element_embeddings`` catalog entry stores."""

    x: torch.Tensor
    cache_key: str = ""
    model: str = ""

    def to_tensors(self) -> dict[str, Any]:
        """The stored form."""
        return {"x": self.x, "__metadata__": {"cache_key": self.cache_key, "model": self.model}}

    @classmethod
    def from_tensors(cls, data: dict[str, Any]) -> Embeddings:
        """Back from :meth:`to_tensors`."""
        meta = data.get("__metadata__") or {}
        return cls(x=data["x"], cache_key=str(meta.get("cache_key", "")), model=str(meta.get("model", "")))


# a counter of backbone forward passes (tests assert a cached run does none)
FORWARD_PASSES = {"count": 0}


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def extract(
    rep: Representation,
    images: ImageSet,
    batch_size: int = 128,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    on_bad_image: str = "error",
) -> Features:
    """Run ``rep`` over every image of ``images``; returns features in the same order."""
    feats, oks = [], []
    for out, ok in extract_batches(rep, images, batch_size, num_workers, progress, desc, on_bad_image):
        feats.append(out)
        oks.append(ok)
    x = torch.cat(feats) if feats else torch.zeros(0, rep.dim)
    ok = torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)
    return Features(x=x.contiguous(), y=torch.as_tensor(images.labels, dtype=torch.int64), ok=ok)


def extract_batches(
    rep: Representation,
    images: ImageSet,
    batch_size: int = 128,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    on_bad_image: str = "error",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Features of ``images`` batch by batch, in order: ``(x (B, D) float32 on the CPU, ok (B,) bool)``.

    DataLoader workers decode and resize (pinned memory on CUDA); the model runs under
    autocast (bf16 where supported) on CUDA with non-blocking host-to-device copies.
    """
    device = next(rep.model.parameters()).device
    workers = _default_workers() if num_workers is None else num_workers
    loader = DataLoader(
        Resized(images, rep.input_size, rep.interpolation, on_bad_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    amp_dtype = autocast_dtype(device)
    bar = _progress(total=len(images), desc=desc, enabled=progress)
    try:
        for batch, ok in loader:
            batch = batch.to(device, non_blocking=True)
            FORWARD_PASSES["count"] += 1
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = rep.forward_uint8(batch)
            bar.update(len(batch))
            yield out.float().cpu(), ok
    finally:
        bar.close()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for inference on CUDA: bf16 where supported, else fp16; none on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=2.0)


def cache_key(rep: Representation, images_fingerprint: str, extra: dict[str, Any] | None = None) -> str:
    """Hash of weights, architecture, layer, pooling, preprocessing (resolution included) and data:
    equal key, equal features. The default representation (penultimate layer, average pooling) keeps
    the key format of earlier versions, so existing cache entries stay valid."""
    payload = {
        "version": CACHE_VERSION,
        "model": rep.spec.model,
        "weights": rep.weights_fingerprint,
        "preprocess": rep.preprocess_config(),
        "images": images_fingerprint,
        "extra": extra or {},
    }
    layer, pooling = getattr(rep, "layer", "penultimate"), getattr(rep, "pooling", "avg")
    if (layer, pooling) != ("penultimate", "avg"):
        payload["layer"] = layer
        payload["pooling"] = pooling
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {})


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: tensors and metadata."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def extract_cached(
    rep: Representation,
    images: ImageSet,
    cache_dir: str | Path,
    extra_key: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Features, str]:
    """Features of ``images`` from the cache when present, else extracted and stored.

    Returns the features and the cache key.
    """
    key = cache_key(rep, images.fingerprint(), extra_key)
    path = Path(cache_dir) / f"{key}.safetensors"
    feats = _read_entry(path)
    if feats is not None:
        logger.info("features of %s: cache hit %s", rep.spec.display_name, path)
        return feats, key
    feats = extract(rep, images, **kwargs)
    _write_entry(path, feats, rep, key)
    return feats, key


def _read_entry(path: Path) -> Features | None:
    """A cache entry's features, or ``None`` when it is absent or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        t, _ = load_tensors(path)
        return Features(x=t["x"], y=t["y"], ok=t["ok"].bool())
    except Exception as exc:  # a corrupt entry is recomputed, never trusted
        logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        return None


def _write_entry(path: Path, feats: Features, rep: Representation, key: str) -> None:
    save_tensors(
        path,
        {"x": feats.x, "y": feats.y, "ok": feats.ok.to(torch.uint8)},
        {"backbone": rep.spec.display_name, "model": rep.spec.model, "layer": rep.layer, "key": key},
    )


def extract_cached_layers(
    combined: Representation,
    reps: dict[str, Representation],
    images: ImageSet,
    cache_dir: str | Path,
    **kwargs: Any,
) -> dict[str, tuple[Features, str]]:
    """Features of several layers of one backbone (:func:`~iis_study.core.representations.backbones.build_layers`),
    each cached under its own key exactly as :func:`extract_cached` would cache it alone.

    Layers already in the cache are read from it; if any is missing, one forward pass over
    ``images`` computes them all (the layers share the data loading, the resizing and the
    blocks up to each layer) and the missing entries are written. Returns ``{layer: (features, key)}``.
    """
    fingerprint = images.fingerprint()
    keys = {lay: cache_key(rep, fingerprint) for lay, rep in reps.items()}
    paths = {lay: Path(cache_dir) / f"{key}.safetensors" for lay, key in keys.items()}
    out: dict[str, tuple[Features, str]] = {}
    for lay in reps:
        feats = _read_entry(paths[lay])
        if feats is not None:
            out[lay] = feats, keys[lay]
    missing = [lay for lay in reps if lay not in out]
    if out:
        logger.info("features of %s: cache hit for layers %s", combined.spec.display_name, sorted(out))
    if not missing:
        return out
    feats = extract(combined, images, **kwargs)
    for lay in missing:
        cols = reps[lay].model  # the layer's columns of the combined features (backbones._LayerOf)
        layer_feats = Features(
            x=feats.x[:, cols.start : cols.start + cols.num_features].contiguous(), y=feats.y, ok=feats.ok
        )
        _write_entry(paths[lay], layer_feats, reps[lay], keys[lay])
        out[lay] = layer_feats, keys[lay]
    logger.info("features of %s: layers %s extracted in one pass", combined.spec.display_name, missing)
    return out


def cached_features(
    spec: BackboneParams, images: ImageSet, device: str, **kwargs: Any
) -> tuple[Features, str, Representation]:
    """Features of ``images`` for ``spec`` from the cache, else extracted and cached.

    A family member (``family_layers`` set by the ``families`` expansion) is extracted together
    with the other layers of its family at the same resolution, in one forward pass that caches
    every layer (bit-identical to extracting each alone): the siblings' nodes then read the
    cache instead of running the backbone again. Returns the features, cache key and representation.
    """
    if spec.family_layers is not None and len(set(spec.family_layers) | {spec.layer}) > 1:
        combined, reps = build_layers(spec, [*spec.family_layers, spec.layer], device=device)
        feats, key = extract_cached_layers(combined, reps, images, **kwargs)[spec.layer]
        return feats, key, reps[spec.layer]
    rep = build(spec, device=device)
    feats, key = extract_cached(rep, images, **kwargs)
    return feats, key, rep


def extract_sharded_cached(
    rep: Representation,
    images: ImageSet,
    cache_dir: str | Path,
    storage_dtype: str = "float32",
    shard_rows: int = 16384,
    extra_key: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[ShardedArray, torch.Tensor, torch.Tensor, str]:
    """Features of ``images`` as a sharded on-disk store (out-of-core), from the cache when present.

    The store lives in the cache (``<cache_dir>/<key>.<dtype>.shards/``); nothing of size N is
    held in memory: batches go straight to shard files. An interrupted extraction resumes at
    the first shard not yet on disk. Returns ``(x, y, ok, key)`` with ``x`` the
    :class:`ShardedArray` of all images (unreadable ones included as zero rows, ``ok`` False).
    """
    check_storage(storage_dtype, shard_rows)
    key = cache_key(rep, images.fingerprint(), extra_key)
    root = Path(cache_dir) / f"{key}.{storage_dtype}.shards"
    n = len(images)
    if (root / "manifest.json").is_file():
        try:
            x = ShardedArray(root)
            ok = torch.from_numpy(np.load(root / "ok.npy")).bool()
            if len(x) == n and ok.numel() == n:
                logger.info("features of %s: cache hit %s", rep.spec.display_name, root)
                return x, torch.as_tensor(images.labels, dtype=torch.int64), ok, key
        except Exception as exc:  # a damaged store is rebuilt, never trusted
            logger.warning("ignoring unreadable feature store %s (%s)", root, exc)
        (root / "manifest.json").unlink(missing_ok=True)
    writer = ShardWriter(root, rep.dim, dtype=storage_dtype, shard_rows=shard_rows, resume=True)
    done = writer.rows_done
    oks_path = root / "ok.partial.npy"
    oks = [np.load(oks_path)[:done]] if done and oks_path.is_file() else []
    if done and (not oks or oks[0].size != done):
        writer = ShardWriter(root, rep.dim, dtype=storage_dtype, shard_rows=shard_rows, resume=False)
        done, oks = 0, []
    if done:
        logger.info("features of %s: resuming at image %d of %d (%d shards on disk)", rep.spec.display_name, done, n, len(writer.shards))
    rest = images.subset(np.arange(done, n)) if done else images
    kwargs.setdefault("desc", rep.spec.display_name)
    for out, ok in extract_batches(rep, rest, **kwargs):
        writer.append(out)
        oks.append(ok.numpy())
        if writer.rows_done > done:  # a shard was written: record its ok flags
            done = writer.rows_done
            atomic_save_npy(oks_path, np.concatenate(oks)[:done])
    ok_all = np.concatenate(oks) if oks else np.zeros(0, dtype=bool)
    atomic_save_npy(root / "ok.npy", ok_all)
    x = writer.close({"backbone": rep.spec.display_name, "model": rep.spec.model, "key": key})
    oks_path.unlink(missing_ok=True)
    return x, torch.as_tensor(images.labels, dtype=torch.int64), torch.from_numpy(ok_all).bool(), key


def split_features(
    feats: Features, order: Sequence[str], splits: Sequence[str] = ("train", "val", "test")
) -> dict[str, Features]:
    """Cut features extracted over a concatenation of splits back into the named splits."""
    order_arr = np.asarray(order)
    out = {}
    for s in splits:
        idx = torch.from_numpy(np.flatnonzero(order_arr == s))
        out[s] = Features(x=feats.x[idx], y=feats.y[idx], ok=feats.ok[idx])
    return out
