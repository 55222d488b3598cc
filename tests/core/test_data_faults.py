"""Bad data: unreadable, truncated or odd-format images, bad class folders, labels out of range.

Each fault gives a clear error naming the file or class, or (``on_bad_image: skip``) a skipped
image that is counted. Rows of the README's "Failure modes" table point here.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageFile

from iis_study.core.representations import features as F
from iis_study.core.data import (
    BadImageError,
    ImageSet,
    array_image_set,
    check_class_coverage,
    load_dataset,
    read_image,
    stratified_split,
)


def _encoded(fmt: str, size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _folder(root, counts: dict[str, int]):
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


# --------------------------------------------------------------------------- unreadable / truncated files


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("keep", [0.5, 0.95])
@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["default", "LOAD_TRUNCATED_IMAGES"])
def test_truncated_image_raises_naming_the_file(tmp_path, monkeypatch, fmt, suffix, keep, lenient_pillow):
    """A truncated file is an error even where some library told Pillow to pad truncated images."""
    data = _encoded(fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    with pytest.raises(BadImageError, match=rf"cut\.{suffix}.*truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_pillow  # the global setting is restored


@pytest.mark.parametrize("content", [b"", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"<html>404</html>"],
                         ids=["empty", "gif-header-only", "png-header-only", "html"])
def test_unreadable_file_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=r"bad\.png"):
        read_image(path)


def test_wrong_suffix_is_read_by_content(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(_encoded("PNG"))
    assert read_image(path).shape == (48, 48, 3)


# --------------------------------------------------------------------------- pixel formats


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: Image.fromarray(np.array([[0, 128, 255]], np.uint8)), [0, 128, 255]),  # L
        (lambda: Image.fromarray(np.array([[[0, 9], [128, 9], [255, 9]]], np.uint8), "LA"), [0, 128, 255]),
        (lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [128, 128, 128, 255], [255, 255, 255, 7]]], np.uint8)),
         [0, 128, 255]),  # RGBA: alpha dropped
        (lambda: Image.fromarray(np.array([[0, 128, 255]], np.uint8)).convert("P"), [0, 128, 255]),
        (lambda: Image.fromarray(np.array([[0, 255, 255]], np.uint8)).convert("1"), [0, 255, 255]),
        (lambda: Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)), [0, 128, 255]),  # 16-bit grey
    ],
    ids=["grey", "grey+alpha", "rgba", "palette", "1-bit", "16-bit"],
)
def test_odd_pixel_formats_become_rgb_uint8(tmp_path, make, expected):
    path = tmp_path / "img.png"
    make().save(path)
    out = read_image(path)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == expected
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    """Clipping 16-bit values to 255 would turn almost every pixel white."""
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")[..., 0]
    assert len(np.unique(out)) > 32 and out.min() == 0 and out.max() == 255


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (6, 5), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    out = read_image(tmp_path / "print.jpg")
    assert out.shape == (5, 6, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_float_image_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(BadImageError, match=r"depth\.tif.*mode 'F'"):
        read_image(tmp_path / "depth.tif")


# --------------------------------------------------------------------------- folders and classes


def test_class_folder_with_only_non_images_is_named(tmp_path):
    _folder(tmp_path, {"cat": 3})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "notes" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"class folder '.*notes' has no images"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path)})


def test_class_too_small_for_three_splits_is_named(tmp_path):
    ds = load_dataset({"kind": "imagefolder", "root": str(_folder(tmp_path, {"cat": 5, "dog": 2}))})
    with pytest.raises(ValueError, match=r"class 'dog' \(label 1\) has 2 image\(s\); each class needs at least 3"):
        stratified_split(ds.labels, class_names=ds.classes)
    with pytest.raises(ValueError, match=r"class 1 has 2 image"):  # without names: the label
        stratified_split(ds.labels)


def test_class_without_any_image_is_named():
    with pytest.raises(ValueError, match=r"\['b'\] have no images"):
        stratified_split(np.array([0] * 5 + [2] * 5), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"label 3 is out of range for 3 classes"):
        stratified_split(np.array([0, 1, 2, 3] * 3), class_names=["a", "b", "c"])


def test_split_never_leaves_a_class_out_of_test():
    labels = np.repeat(np.arange(5), [3, 4, 7, 50, 3])
    table = stratified_split(labels, (0.8, 0.1, 0.1), seed=1, class_names=list("abcde"))
    check_class_coverage({s: table.loc[table["split"] == s, "label"].to_numpy() for s in ("train", "val", "test")},
                         list("abcde"))


def test_class_in_train_but_not_in_test_is_named():
    """After skipping unreadable files a class can lose its only test image."""
    labels = {"train": np.array([0, 0, 1, 1, 2]), "val": np.array([0, 1, 2]), "test": np.array([0, 2])}
    with pytest.raises(ValueError, match=r"class 'dog' has no images in test \(present in train, val\)"):
        check_class_coverage(labels, ["cat", "dog", "ship"])
    with pytest.raises(ValueError, match=r"test split: labels must lie in \[0, 3\)"):
        check_class_coverage({**labels, "test": np.array([0, 1, 2, 5])}, ["cat", "dog", "ship"])


# --------------------------------------------------------------------------- labels and indices


def test_label_out_of_range_names_the_image():
    with pytest.raises(ValueError, match=r"label 3 of image 'b.png' is out of range; expected labels in \[0, 2\)"):
        ImageSet(classes=["x", "y"], labels=np.array([0, 3]), items=["a.png", "b.png"], name="toy")
    with pytest.raises(ValueError, match=r"label -1 of image '1' is out of range"):
        array_image_set(np.zeros((2, 4, 4, 3), np.uint8), labels=[0, -1])
    with pytest.raises(ValueError, match="labels must be integers"):
        array_image_set(np.zeros((2, 4, 4, 3), np.uint8), labels=[0.0, 0.5])
    with pytest.raises(ValueError, match="one label per image"):
        array_image_set(np.zeros((2, 4, 4, 3), np.uint8), labels=[0, 1, 1])


def test_split_table_for_another_dataset_is_refused():
    ds = array_image_set(np.zeros((4, 4, 4, 3), np.uint8), name="four")
    with pytest.raises(ValueError, match=r"image index 9 is out of range for dataset 'four' with 4 images"):
        ds.subset([0, 9])


# --------------------------------------------------------------------------- skip during extraction


class _Constant:
    """A stand-in representation: mean pixel per channel, so extraction needs no network."""

    def __init__(self):
        import torch

        self.model = torch.nn.Linear(1, 1)
        self.input_size = 8
        self.interpolation = "bilinear"
        self.dim = 3

    def forward_uint8(self, batch):
        return batch.float().mean(dim=(2, 3))


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_in_extraction_is_named_or_skipped_and_counted(tmp_path, caplog, workers):
    _folder(tmp_path, {"cat": 3, "dog": 3})
    data = _encoded("JPEG")
    (tmp_path / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    ds = load_dataset({"kind": "imagefolder", "root": str(tmp_path), "on_bad_image": "skip"})
    with pytest.raises(BadImageError, match=r"cut\.jpg"):  # also through a DataLoader worker
        F.extract(_Constant(), ds, num_workers=workers, progress=False)
    with caplog.at_level(logging.WARNING, logger="iis_study.core.representations.features"):
        f = F.extract(_Constant(), ds, num_workers=0, progress=False, on_bad_image="skip")
    assert f.ok.tolist() == [True] * 6 + [False]  # sorted: cat/0-2, dog/0-2, dog/cut.jpg
    assert f.x.shape == (7, 3) and f.y.tolist() == [0] * 3 + [1] * 4
    assert "cut.jpg" in caplog.text
