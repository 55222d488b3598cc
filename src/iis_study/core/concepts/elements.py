"""Concept elements: image patches and superpixel segments (METHOD §5.1).

* :func:`patch_elements` – a ``grid × grid`` tiling of each source image.
* :func:`segment_elements` – SLIC superpixels, greyed outside their mask.

The concept vectors built from their embeddings: :mod:`.vectors`.

Every element keeps its provenance (source image id, box in the source image,
area fraction), so that concepts can later be shown to a person.

Conventions: boxes are pixel coordinates ``x0, y0, x1, y1`` with ``x1``/``y1``
exclusive (the crop is ``image[y0:y1, x0:x1]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from .blocks import ConceptParams, PatchParams, SegmentParams  # the defaults: the `concepts` block's, written once

logger = logging.getLogger(__name__)

META_COLUMNS: tuple[str, ...] = (
    "element_id",
    "source_id",
    "kind",
    "setting",
    "x0",
    "y0",
    "x1",
    "y1",
    "area_fraction",
)
_INT_COLUMNS: tuple[str, ...] = ("element_id", "source_id", "setting", "x0", "y0", "x1", "y1")


# --------------------------------------------------------------------------- #
# Elements container
# --------------------------------------------------------------------------- #
@dataclass
class Elements:
    """Concept elements: small images cut from source images, with provenance.

    Attributes:
        images: ``(E, S, S, 3)`` uint8 element images.
        meta: one row per element with columns :data:`META_COLUMNS`
            (``element_id`` is ``0..E-1`` in row order).
        masks: ``(E, S, S)`` bool masks at element resolution (all true for
            patches), or ``None``.
    """

    images: np.ndarray
    meta: pd.DataFrame
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"Elements.images must be a (E, S, S, 3) uint8 array, got shape {self.images.shape} "
                f"and dtype {self.images.dtype}"
            )
        if len(self.meta) != len(self.images):
            raise ValueError(
                f"Elements.meta has {len(self.meta)} rows but there are {len(self.images)} element images"
            )
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise ValueError(f"Elements.meta lacks columns {missing}; expected {list(META_COLUMNS)}")
        if self.masks is not None and self.masks.shape != self.images.shape[:3]:
            raise ValueError(
                f"Elements.masks must have shape {self.images.shape[:3]}, got {self.masks.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        """Side length S of the element images."""
        return int(self.images.shape[1])

    @staticmethod
    def empty(size: int) -> "Elements":
        """An element set with no elements, of element size ``size``."""
        return Elements(
            images=np.zeros((0, size, size, 3), dtype=np.uint8),
            meta=_make_meta([]),
            masks=np.zeros((0, size, size), dtype=bool),
        )

    @staticmethod
    def concat(parts: Sequence["Elements"]) -> "Elements":
        """Concatenate element sets; ``element_id`` is renumbered ``0..E-1``.

        Parts without masks get all-true masks if any other part has masks.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("Elements.concat needs at least one part, got an empty sequence")
        sizes = {p.size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"Elements.concat needs parts of one element size, got sizes {sorted(sizes)}")
        images = np.concatenate([p.images for p in parts], axis=0)
        if all(p.masks is None for p in parts):
            masks = None
        else:
            masks = np.concatenate(
                [p.masks if p.masks is not None else np.ones(p.images.shape[:3], dtype=bool) for p in parts],
                axis=0,
            )
        meta = pd.concat([p.meta for p in parts], ignore_index=True)
        meta["element_id"] = np.arange(len(meta), dtype=np.int64)
        return Elements(images=images, meta=meta, masks=masks)


def _make_meta(records: Sequence[dict]) -> pd.DataFrame:
    """Build the element metadata table with fixed columns and dtypes."""
    meta = pd.DataFrame.from_records(list(records), columns=list(META_COLUMNS))
    meta["element_id"] = np.arange(len(meta), dtype=np.int64)
    for col in _INT_COLUMNS:
        meta[col] = meta[col].astype(np.int64)
    meta["kind"] = meta["kind"].astype(object)
    meta["area_fraction"] = meta["area_fraction"].astype(np.float64)
    return meta


# --------------------------------------------------------------------------- #
# Image helpers
# --------------------------------------------------------------------------- #
def _as_rgb(image: np.ndarray, index: int) -> np.ndarray:
    """Validate an image and return it as ``(H, W, 3)`` uint8 (grey is repeated)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images[{index}] must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"images[{index}] must have shape (H, W, 3) (or (H, W) grey), got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def _check_inputs(images: Sequence[np.ndarray], source_ids: Sequence[int], size: int) -> None:
    if len(images) != len(source_ids):
        raise ValueError(
            f"source_ids must have one id per image: got {len(source_ids)} ids for {len(images)} images"
        )
    if size < 1:
        raise ValueError(f"size must be a positive element side length in pixels, got {size}")


def _resize_rgb(crop: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``(h, w, 3)`` uint8 crop to ``(size, size, 3)`` with PIL bicubic."""
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``(size, size)`` with nearest-neighbour sampling."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST)) > 127


def grid_edges(length: int, grid: int) -> np.ndarray:
    """Integer cell edges ``0 = e_0 < ... < e_grid = length`` splitting ``length`` into ``grid`` cells.

    When ``length`` is not divisible by ``grid`` the cells differ by at most one pixel.
    """
    return (np.arange(grid + 1) * length) // grid


# --------------------------------------------------------------------------- #
# Patches
# --------------------------------------------------------------------------- #
def patch_elements(
    images: Sequence[np.ndarray], source_ids: Sequence[int], grid: int = PatchParams.grid,
    size: int = ConceptParams.element_size,
) -> Elements:
    """Cut each image into a ``grid × grid`` tiling and resize each cell to ``size × size``.

    Cells are numbered row-major (``setting`` = ``row * grid + col``). Image sides
    not divisible by ``grid`` are split into cells differing by at most one pixel
    (:func:`grid_edges`); ``area_fraction`` is the cell's exact share of the image
    (``1 / grid²`` when divisible).

    Raises:
        ValueError: if ``grid`` exceeds an image side, or inputs are malformed.
    """
    _check_inputs(images, source_ids, size)
    if grid < 1:
        raise ValueError(f"grid must be a positive number of cells per side, got {grid}")
    crops: list[np.ndarray] = []
    records: list[dict] = []
    for idx, (raw, sid) in enumerate(zip(images, source_ids)):
        image = _as_rgb(raw, idx)
        height, width = image.shape[:2]
        if grid > min(height, width):
            raise ValueError(f"grid={grid} exceeds the side of images[{idx}] with shape {image.shape}")
        ys, xs = grid_edges(height, grid), grid_edges(width, grid)
        for row in range(grid):
            for col in range(grid):
                y0, y1, x0, x1 = int(ys[row]), int(ys[row + 1]), int(xs[col]), int(xs[col + 1])
                crops.append(_resize_rgb(np.ascontiguousarray(image[y0:y1, x0:x1]), size))
                records.append(
                    dict(element_id=0, source_id=int(sid), kind="patch", setting=row * grid + col,
                         x0=x0, y0=y0, x1=x1, y1=y1,
                         area_fraction=(y1 - y0) * (x1 - x0) / (height * width))
                )
    if not records:
        return Elements.empty(size)
    out = Elements(
        images=np.stack(crops), meta=_make_meta(records), masks=np.ones((len(crops), size, size), dtype=bool)
    )
    logger.info("Cut %d patch elements from %d images (grid %d, size %d)", len(out), len(images), grid, size)
    return out


# --------------------------------------------------------------------------- #
# Segments
# --------------------------------------------------------------------------- #
def _mask_iou(mask: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """IoU of one ``(H, W)`` mask with each of ``kept`` ``(K, H, W)`` masks."""
    if kept.shape[0] == 0:
        return np.zeros(0)
    inter = np.logical_and(kept, mask).sum(axis=(1, 2))
    union = np.logical_or(kept, mask).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


def _segments_by_area(labels: np.ndarray) -> list[int]:
    """Segment labels ordered by decreasing area (ties: smaller label first)."""
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))
    return [int(i) for i in ids[order]]


def _crop_segment(
    image: np.ndarray, mask: np.ndarray, fill: int, size: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Bounding-box crop of a segment, ``fill`` outside the mask, resized to ``size``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = image[y0:y1, x0:x1].copy()
    crop_mask = mask[y0:y1, x0:x1]
    crop[~crop_mask] = fill
    return _resize_rgb(crop, size), _resize_mask(crop_mask, size), (x0, y0, x1, y1)


def select_segments(
    image: np.ndarray,
    n_segments: Sequence[int] = SegmentParams.n_segments,
    compactness: float = SegmentParams.compactness,
    sigma: float = SegmentParams.sigma,
    max_per_setting: int = SegmentParams.max_per_setting,
    iou_threshold: float = SegmentParams.iou_threshold,
    min_area: float = SegmentParams.min_area,
) -> list[tuple[int, np.ndarray]]:
    """The kept SLIC segments of one ``(H, W, 3)`` uint8 image as ``(setting, mask)`` pairs.

    Selection rule: see :func:`segment_elements`. Masks are ``(H, W)`` bool at
    source resolution.
    """
    from skimage.segmentation import slic

    height, width = image.shape[:2]
    kept = np.zeros((0, height, width), dtype=bool)
    selected: list[tuple[int, np.ndarray]] = []
    for setting in n_segments:
        labels = slic(image, n_segments=int(setting), compactness=compactness, sigma=sigma,
                      start_label=0, channel_axis=-1)
        n_kept = 0
        for label in _segments_by_area(labels):
            if n_kept >= max_per_setting:
                break
            mask = labels == label
            if mask.mean() < min_area:
                break  # visited largest first: every later segment is as small or smaller
            if np.any(_mask_iou(mask, kept) > iou_threshold):
                continue
            kept = np.concatenate([kept, mask[None]], axis=0)
            selected.append((int(setting), mask))
            n_kept += 1
    return selected


def _segment_one_image(
    image: np.ndarray, source_id: int, fill: int, size: int, **select_kwargs
) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """Element images, element masks and metadata records of one image's kept segments."""
    crops: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    records: list[dict] = []
    for setting, mask in select_segments(image, **select_kwargs):
        crop, crop_mask, (x0, y0, x1, y1) = _crop_segment(image, mask, fill, size)
        crops.append(crop)
        masks.append(crop_mask)
        records.append(dict(element_id=0, source_id=int(source_id), kind="segment", setting=setting,
                            x0=x0, y0=y0, x1=x1, y1=y1, area_fraction=float(mask.mean())))
    return crops, masks, records


def segment_elements(
    images: Sequence[np.ndarray],
    source_ids: Sequence[int],
    n_segments: Sequence[int] = SegmentParams.n_segments,
    compactness: float = SegmentParams.compactness,
    sigma: float = SegmentParams.sigma,
    max_per_setting: int = SegmentParams.max_per_setting,
    iou_threshold: float = SegmentParams.iou_threshold,
    min_area: float = SegmentParams.min_area,
    fill: int = SegmentParams.fill,
    size: int = ConceptParams.element_size,
    n_jobs: int = SegmentParams.n_jobs,
    seed: int = ConceptParams.seed,
) -> Elements:
    """SLIC superpixel elements (METHOD §5.1, *segments*).

    For each image and each SLIC setting in ``n_segments`` (``start_label=0``,
    ``channel_axis=-1``), the segments are visited **largest first** (ties: lower
    label first) and a segment is kept unless

    * its mask covers less than ``min_area`` of the image, or
    * its mask IoU with a segment already kept for the same image (any setting)
      is greater than ``iou_threshold``,

    until ``max_per_setting`` segments are kept for that setting. The element
    image is the segment's bounding-box crop with pixels outside the mask set to
    ``fill`` (mid-grey 117), resized to ``size × size`` (PIL bicubic); its mask is
    resized with nearest-neighbour sampling.

    The selection has no randomness (SLIC is deterministic), so ``seed`` does not
    change the result; it is accepted so that callers can pass the run seed
    uniformly. Images are processed in parallel with joblib when ``n_jobs != 1``;
    the output does not depend on ``n_jobs``.
    """
    _check_inputs(images, source_ids, size)
    if max_per_setting < 1:
        raise ValueError(f"max_per_setting must be >= 1, got {max_per_setting}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    if not 0 <= fill <= 255:
        raise ValueError(f"fill must be a grey value in [0, 255], got {fill}")
    if not n_segments or any(int(n) < 1 for n in n_segments):
        raise ValueError(f"n_segments must be a non-empty list of positive ints, got {n_segments}")
    rgb = [_as_rgb(img, i) for i, img in enumerate(images)]
    kwargs = dict(n_segments=tuple(int(n) for n in n_segments), compactness=compactness, sigma=sigma,
                  max_per_setting=max_per_setting, iou_threshold=iou_threshold, min_area=min_area,
                  fill=fill, size=size)
    if n_jobs == 1:
        results = [_segment_one_image(img, sid, **kwargs) for img, sid in zip(rgb, source_ids)]
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(
            delayed(_segment_one_image)(img, sid, **kwargs) for img, sid in zip(rgb, source_ids)
        )
    crops = [c for r in results for c in r[0]]
    if not crops:
        logger.warning("No segment elements survived the filters for %d images", len(images))
        return Elements.empty(size)
    out = Elements(
        images=np.stack(crops),
        meta=_make_meta([rec for r in results for rec in r[2]]),
        masks=np.stack([m for r in results for m in r[1]]),
    )
    logger.info("Cut %d segment elements from %d images (settings %s)", len(out), len(images),
                list(kwargs["n_segments"]))
    return out
