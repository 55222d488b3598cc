"""Datasets and splits."""

import numpy as np
import pytest
from PIL import Image

from iis_study.core.data import (
    BadImageError,
    DatasetParams,
    load_dataset,
    read_image,
    stratified_split,
)


def test_digits_are_rgb_uint8_at_requested_size():
    ds = load_dataset({"kind": "digits", "image_size": 24})
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    img = ds.load(0)
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    assert img.min() < 100 < img.max()  # strokes and background


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(4), [50, 30, 20, 10])
    a = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    b = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    c = stratified_split(labels, (0.6, 0.2, 0.2), seed=4)
    assert a.equals(b)
    assert not a.equals(c)
    assert a["index"].is_unique and len(a) == len(labels)
    for split, frac in zip(["train", "val", "test"], [0.6, 0.2, 0.2]):
        part = a[a["split"] == split]
        counts = part["label"].value_counts().sort_index().to_numpy()
        np.testing.assert_allclose(counts, np.array([50, 30, 20, 10]) * frac, atol=1)
    assert (labels[a["index"]] == a["label"]).all()


def test_max_per_class_subsamples_every_class():
    labels = np.repeat(np.arange(3), 100)
    t = stratified_split(labels, seed=0, max_per_class=10)
    assert t.groupby("label").size().tolist() == [10, 10, 10]
    assert set(t.groupby(["label", "split"]).size().index.get_level_values(1)) == {"train", "val", "test"}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (0.8, 0.2, 0.0)])
def test_bad_fractions_name_the_parameter(fractions):
    with pytest.raises(ValueError, match="splits.fractions"):
        stratified_split(np.repeat(np.arange(2), 10), fractions)


def test_imagefolder_reads_tree(tiny_imagefolder):
    ds = load_dataset({"kind": "imagefolder", "root": str(tiny_imagefolder)})
    assert ds.classes == ["cat", "dog", "ship"]
    assert len(ds) == 18 and np.bincount(ds.labels).tolist() == [6, 6, 6]
    assert ds.load(7).shape == (20, 24, 3)


def test_imagefolder_converts_grey_and_rgba(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "a" / "g.png")
    Image.fromarray(np.zeros((5, 5, 4), np.uint8)).save(tmp_path / "a" / "r.png")
    ds = load_dataset({"kind": "imagefolder", "root": str(tmp_path)})
    assert all(ds.load(i).shape == (5, 5, 3) for i in range(2))


def test_missing_and_empty_roots_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="no class folders"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path)})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class.*no images"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path)})


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match="broken.jpg"):
        read_image(bad)


def test_spec_rejects_unknown_kind_and_keys():
    with pytest.raises(ValueError, match="dataset.kind"):
        DatasetParams.from_params({"kind": "mnist"})
    with pytest.raises(ValueError, match="unknown key"):
        DatasetParams.from_params({"kind": "digits", "rooot": "x"})
