"""Datasets of labelled images and deterministic stratified splits.

An :class:`ImageSet` is a light, picklable list of images with labels: every image is
decoded on demand by :meth:`ImageSet.load` as an ``(H, W, 3)`` ``uint8`` RGB array, so a
``DataLoader`` worker can decode while the main process runs the backbone.

Kinds (``DatasetParams.kind``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits, rendered as RGB images of
  ``image_size`` pixels (offline, the embedded default);
- ``imagefolder``: any ``root/<class>/*.{jpg,jpeg,png,...}`` tree (ImageNet, CUB, CIFAR-10 as JPEGs);
- ``cifar10`` / ``cifar100``: torchvision's loaders (``download`` configurable), train and test
  parts pooled before our own split.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError

from .params import Params, block, check_int

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KINDS = ("digits", "imagefolder", "cifar10", "cifar100")
SPLITS = ("train", "val", "test")


class BadImageError(ValueError):
    """An image file that cannot be decoded (unreadable, truncated, unsupported pixel format)."""


# what Pillow raises on broken files: OSError (truncated, decoder errors), SyntaxError ("broken PNG
# file"), EOFError, struct.error (bad headers), ValueError and DecompressionBombError (huge images)
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)
_STRICT_LOAD = threading.Lock()
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@block
class DatasetParams(Params):
    """What dataset to read and how (the ``dataset`` block of ``conf/<env>/globals.yml``, which both the
    ``images`` catalog entry and ``params:dataset`` read)."""

    WHERE = "dataset"
    kind: str = "digits"  # digits | imagefolder | cifar10 | cifar100
    root: str | None = None  # imagefolder: root/<class>/*.jpg ; cifar10/100: torchvision root
    download: bool = False  # cifar10/100 only (needs internet)
    image_size: int = 32  # digits only: the 8x8 digits are rendered at this size
    on_bad_image: str = "error"  # error | skip (skipped files are counted and logged)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when the spec is malformed."""
        if self.kind not in KINDS:
            raise ValueError(f"dataset.kind = {self.kind!r} is not one of {list(KINDS)}")
        if self.kind in ("imagefolder", "cifar10", "cifar100") and not self.root:
            raise ValueError(f"dataset.root is required for dataset.kind = {self.kind!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"dataset.image_size must be an integer >= 8, got {self.image_size!r}")
        if self.on_bad_image not in ("error", "skip"):
            raise ValueError(
                f"dataset.on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}"
            )


@block
class SplitParams(Params):
    """``splits``: the stratified train / val (selection) / test (reported) split."""

    WHERE = "splits"
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2)
    seed: int = 0
    max_per_class: int | None = None

    def validate(self) -> None:
        fr = self.fractions
        if (
            not isinstance(fr, tuple)
            or len(fr) != 3
            or any(not isinstance(f, int | float) or isinstance(f, bool) or f <= 0 for f in fr)
            or abs(sum(fr) - 1) > 1e-6
        ):
            raise ValueError(f"splits.fractions must be three positive numbers (train, val, test) summing to 1, got {fr}")
        check_int(self.seed, "splits.seed")
        if self.max_per_class is not None:
            check_int(self.max_per_class, "splits.max_per_class", 3)


@dataclass
class ImageSet:
    """Images with integer labels; ``items[i]`` is a file path or an index into ``arrays``."""

    classes: list[str]
    labels: np.ndarray
    items: list[str]
    arrays: np.ndarray | None = None
    name: str = ""
    skipped: list[str] = field(default_factory=list)
    on_bad_image: str = "error"  # what extraction does with an unreadable file: error | skip
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        self.validate()

    def validate(self) -> None:
        """Check that labels are integers, one per item, within ``[0, len(classes))``.

        Raises ``ValueError`` naming the first offending item and its label.
        """
        what = f"dataset {self.name!r}" if self.name else "dataset"
        if self.labels.ndim != 1 or len(self.labels) != len(self.items):
            raise ValueError(
                f"{what}: need one label per image, got {self.labels.shape} labels for {len(self.items)} images"
            )
        if len(self.labels) == 0:
            return
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"{what}: labels must be integers, got dtype {self.labels.dtype}")
        upper = len(self.classes) if self.classes else None
        bad = (self.labels < 0) if upper is None else (self.labels < 0) | (self.labels >= upper)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            expected = "a label >= 0" if upper is None else f"labels in [0, {upper}) for classes {self.classes}"
            raise ValueError(
                f"{what}: label {int(self.labels[i])} of image {self.items[i]!r} is out of range; "
                f"expected {expected} ({int(bad.sum())} image(s) out of range)"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        """Decode image ``i`` as an ``(H, W, 3)`` uint8 RGB array (grey and RGBA converted)."""
        if self.arrays is not None:
            return self.arrays[int(self.items[i])]
        return read_image(self.items[i])

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self.labels)
        out_of_range = (idx < 0) | (idx >= n)
        if out_of_range.any():
            raise ValueError(
                f"image index {int(idx[out_of_range][0])} is out of range for dataset {self.name!r} with {n} "
                "images: the split table was written for another dataset; re-run the data_processing pipeline"
            )
        return ImageSet(
            classes=self.classes,
            labels=self.labels[idx],
            items=[self.items[i] for i in idx],
            arrays=self.arrays,
            name=self.name,
            on_bad_image=self.on_bad_image,
        )

    def fingerprint(self) -> str:
        """A hash of the images' identities and labels (file paths or array contents), computed
        once per image set (an ImageNet folder is ~1.3 M ``stat`` calls)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        if self.arrays is not None:
            idx = np.asarray([int(i) for i in self.items], dtype=np.int64)
            h.update(np.ascontiguousarray(self.arrays[idx]).tobytes())
        else:
            for item in self.items:
                p = Path(item)
                h.update(item.encode())
                try:
                    st = p.stat()
                    h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
                except OSError:
                    h.update(b"missing")
        return h.hexdigest()[:16]


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as an ``(H, W, 3)`` uint8 RGB array.

    Grey, palette, CMYK and RGBA images are converted to RGB (alpha dropped); 16-bit images are
    scaled to 8 bits (not clipped). A truncated file raises even where another library has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (which would pad it with grey). Any failure raises
    :class:`BadImageError` naming the file.
    """
    try:
        with Image.open(path) as im:
            _load_strict(im)
            return _to_rgb(im)
    except BadImageError as exc:
        raise BadImageError(f"cannot read image file {str(path)!r}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise BadImageError(f"cannot read image file {str(path)!r}: {exc}") from exc


def _load_strict(im: Image.Image) -> None:
    """Decode ``im`` fully; a truncated file raises ``OSError`` whatever the global Pillow setting."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        im.load()
        return
    with _STRICT_LOAD:  # the flag is process-wide: restore it for whoever set it
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of a decoded image (16-bit scaled down, float rejected)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(im, dtype=np.float64)
        grey = np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        raise BadImageError("floating-point pixels (mode 'F') are not supported; convert the file to 8-bit")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def array_image_set(images: np.ndarray, labels: Sequence[int] | None = None, name: str = "arrays") -> ImageSet:
    """Wrap an ``(N, H, W, 3)`` uint8 array (e.g. concept elements) as an :class:`ImageSet`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected images of shape (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    lab = np.zeros(len(images), dtype=np.int64) if labels is None else np.asarray(labels)
    return ImageSet(classes=[], labels=lab, items=[str(i) for i in range(len(images))], arrays=images, name=name)


def _digits(image_size: int) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels -> 0..255, dark strokes on a white page like a scanned digit
    small = (255 - d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC)) for im in small]
    )
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return ImageSet(
        classes=[str(c) for c in range(10)],
        labels=d.target.astype(np.int64),
        items=[str(i) for i in range(len(rgb))],
        arrays=rgb,
        name=f"digits@{image_size}",
    )


def _imagefolder(root: str, on_bad_image: str = "error") -> ImageSet:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(
            f"dataset.root {str(base)!r} does not exist or is not a folder; expected root/<class>/*.jpg"
        )
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"dataset.root {str(base)!r} has no class folders; expected root/<class>/*.jpg")
    classes, labels, items = [], [], []
    for c, d in enumerate(class_dirs):
        files = sorted(
            str(p) for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(
                f"class folder {str(d)!r} has no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        classes.append(d.name)
        items.extend(files)
        labels.extend([c] * len(files))
    return ImageSet(
        classes=classes,
        labels=np.asarray(labels, dtype=np.int64),
        items=items,
        name=f"imagefolder:{base.resolve()}",
    )


def _torchvision_cifar(kind: str, root: str, download: bool) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    try:
        parts = [cls(root=root, train=t, download=download) for t in (True, False)]
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"dataset.root {root!r} holds no {kind} data ({exc}); set dataset.download: true "
            "(needs internet) or use dataset.kind: imagefolder on a folder of images"
        ) from exc
    arrays = np.concatenate([p.data for p in parts]).astype(np.uint8)
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    return ImageSet(
        classes=list(parts[0].classes),
        labels=labels,
        items=[str(i) for i in range(len(arrays))],
        arrays=arrays,
        name=kind,
    )


def load_dataset(spec: DatasetParams | dict[str, Any]) -> ImageSet:
    """Open the dataset described by ``spec`` (cheap: images are decoded later)."""
    spec = DatasetParams.from_params(spec)
    if spec.kind == "digits":
        images = _digits(spec.image_size)
    elif spec.kind == "imagefolder":
        images = _imagefolder(spec.root, spec.on_bad_image)
    else:
        images = _torchvision_cifar(spec.kind, spec.root, spec.download)
    images.on_bad_image = spec.on_bad_image
    return images


def stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    max_per_class: int | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Deterministic stratified train/val/test split.

    Within each class the images are shuffled with a generator seeded by ``seed``, optionally
    cut to ``max_per_class`` and divided by ``fractions``. Every class gets at least one image
    in every split, so a class can't be present in train and absent from test. ``class_names``
    (optional, one per label) makes errors name the class, and makes a class with no image at
    all an error too.

    Returns a frame with columns ``index`` (position in the dataset), ``label`` and ``split``,
    sorted by split then index.
    """
    labels = np.asarray(labels, dtype=np.int64)
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or np.any(fr <= 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"splits.fractions must be three positive numbers (train, val, test) summing to 1, got {list(fractions)}"
        )
    if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class < 3):
        raise ValueError(f"splits.max_per_class must be an integer >= 3 or null, got {max_per_class!r}")
    _check_labels_cover(labels, class_names)
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n = len(idx)
        if n < 3:
            raise ValueError(
                f"class {_class_label(int(c), class_names)} has {n} image(s); each class needs at least 3 "
                "(one per split: train, val, test)"
            )
        n_val = max(1, int(round(fr[1] * n)))
        n_test = max(1, int(round(fr[2] * n)))
        n_train = n - n_val - n_test
        if n_train < 1:
            n_train, n_val = 1, n - 1 - n_test
        parts = np.split(idx, [n_train, n_train + n_val])
        for name, part in zip(SPLITS, parts):
            rows.extend((int(i), int(c), name) for i in part)
    out = pd.DataFrame(rows, columns=["index", "label", "split"])
    out["split"] = pd.Categorical(out["split"], categories=list(SPLITS), ordered=True)
    out = out.sort_values(["split", "index"]).reset_index(drop=True)
    out["split"] = out["split"].astype(str)
    return out


def split_table(
    images: ImageSet, fractions: Sequence[float], seed: int, max_per_class: int | None = None
) -> pd.DataFrame:
    """:func:`stratified_split` of an image set, with each row's ``class_name`` and ``item`` (file
    path or array index): ``index``, ``label``, ``class_name``, ``item``, ``split``."""
    table = stratified_split(
        images.labels, fractions=fractions, seed=seed, max_per_class=max_per_class, class_names=images.classes
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


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    """``'dog' (label 1)`` when names are known, else ``1``."""
    if class_names is not None and 0 <= c < len(class_names):
        return f"{class_names[c]!r} (label {c})"
    return str(c)


def _check_labels_cover(labels: np.ndarray, class_names: Sequence[str] | None) -> None:
    """With ``class_names``: every label in range and every class present at least once."""
    if class_names is None:
        return
    k = len(class_names)
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        raise ValueError(
            f"label {int(labels[bad][0])} is out of range for {k} classes {list(class_names)} "
            f"({int(bad.sum())} label(s) out of range)"
        )
    counts = np.bincount(labels, minlength=k)
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"class(es) {empty} have no images; each class needs at least 3 (one per split)")


def check_class_coverage(
    split_labels: Mapping[str, np.ndarray | Sequence[int]],
    class_names: Sequence[str],
    splits: Sequence[str] = SPLITS,
) -> None:
    """Raise ``ValueError`` naming every class absent from a split where it is expected.

    Use after images were dropped (``dataset.on_bad_image: skip``): a class present in train but
    absent from test (or the other way round) would otherwise silently change what the reported
    accuracy measures. ``split_labels`` maps a split name to the labels of its remaining images.
    """
    k = len(class_names)
    present = {}
    for name in splits:
        if name not in split_labels:
            raise ValueError(f"split {name!r} is missing; got splits {sorted(split_labels)}")
        lab = np.asarray(split_labels[name], dtype=np.int64)
        if lab.size and (lab.min() < 0 or lab.max() >= k):
            raise ValueError(
                f"{name} split: labels must lie in [0, {k}) for classes {list(class_names)}, "
                f"got range [{int(lab.min())}, {int(lab.max())}]"
            )
        present[name] = np.bincount(lab, minlength=k) > 0
    missing = []
    for name in splits:
        for c in np.flatnonzero(~present[name]):
            elsewhere = [o for o in splits if o != name and present[o][c]]
            missing.append(f"class {class_names[c]!r} has no images in {name} (present in {', '.join(elsewhere) or 'none'})")
    if missing:
        raise ValueError(
            "; ".join(missing) + ". Every class needs at least one readable image in every split: "
            "replace the unreadable files or add images to these classes"
        )
