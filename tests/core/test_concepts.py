"""Tests for concept elements and concept vectors (iis_study.core.concepts.elements)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from iis_study.core.concepts.elements import META_COLUMNS, Elements, patch_elements, segment_elements, select_segments
from iis_study.core.concepts.vectors import (
    check_m,
    cluster_vectors,
    end_to_end_elements,
    prototype_indices,
    prototype_vectors,
)

FILL = 117


def block_image() -> np.ndarray:
    """32×32 image of four distinct colour blocks plus a small square (no colour near grey 117)."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:16, :16] = (230, 20, 20)
    img[:16, 16:] = (20, 230, 20)
    img[16:, :16] = (20, 20, 230)
    img[16:, 16:] = (240, 240, 10)
    img[4:10, 4:10] = (10, 10, 10)
    return img


def random_images(n: int, seed: int = 0, shape: tuple[int, int] = (32, 32)) -> list[np.ndarray]:
    """Smooth-ish random images (upsampled noise) so SLIC finds varied segments."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, shape[0] // 4, shape[1] // 4, 3), dtype=np.uint8)
    return [np.kron(s, np.ones((4, 4, 1), dtype=np.uint8)) for s in small]


# --------------------------------------------------------------------------- patches
@pytest.mark.parametrize("shape", [(32, 32), (30, 27)])
def test_patches_tile_each_image(shape: tuple[int, int]) -> None:
    h, w = shape
    images = [np.full((h, w, 3), i * 10, dtype=np.uint8) for i in range(3)]
    el = patch_elements(images, source_ids=[7, 8, 9], grid=4, size=20)
    assert el.images.shape == (48, 20, 20, 3) and el.images.dtype == np.uint8
    assert list(el.meta.columns) == list(META_COLUMNS)
    assert el.meta["element_id"].tolist() == list(range(48))
    assert (el.meta["kind"] == "patch").all()
    assert el.masks is not None and el.masks.all()
    for sid, group in el.meta.groupby("source_id"):
        assert len(group) == 16 and sorted(group["setting"]) == list(range(16))
        cover = np.zeros((h, w), dtype=int)
        for r in group.itertuples():
            assert r.x1 > r.x0 and r.y1 > r.y0
            cover[r.y0:r.y1, r.x0:r.x1] += 1
            assert r.area_fraction == pytest.approx((r.x1 - r.x0) * (r.y1 - r.y0) / (h * w))
        assert (cover == 1).all(), "patches must tile the image exactly once"
        assert group["area_fraction"].sum() == pytest.approx(1.0)
    # each patch of a constant image is that constant; source ids map to images
    for r in el.meta.itertuples():
        assert (el.images[r.element_id] == (r.source_id - 7) * 10).all()


def test_patches_crop_content() -> None:
    img = block_image()
    el = patch_elements([img], [0], grid=4, size=8)
    # cell 15 (bottom-right) lies inside the yellow block
    assert (el.images[15] == img[31, 31]).all()
    assert el.meta.loc[15, ["x0", "y0", "x1", "y1"]].tolist() == [24, 24, 32, 32]
    assert el.meta.loc[0, "area_fraction"] == pytest.approx(1 / 16)


def test_patches_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="source_ids"):
        patch_elements([block_image()], [0, 1])
    with pytest.raises(ValueError, match="uint8"):
        patch_elements([block_image().astype(np.float32)], [0])
    with pytest.raises(ValueError, match="grid"):
        patch_elements([np.zeros((3, 3, 3), np.uint8)], [0], grid=4)


# --------------------------------------------------------------------------- segments
def test_segments_deterministic_and_valid() -> None:
    images = random_images(4) + [block_image()]
    a = segment_elements(images, list(range(10, 15)), size=24, n_jobs=1)
    b = segment_elements(images, list(range(10, 15)), size=24, n_jobs=1)
    assert len(a) > 0
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    pd.testing.assert_frame_equal(a.meta, b.meta)
    assert a.images.shape == (len(a), 24, 24, 3) and a.images.dtype == np.uint8
    assert a.masks.shape == (len(a), 24, 24) and a.masks.dtype == bool
    assert (a.meta["kind"] == "segment").all()
    counts = a.meta.groupby(["source_id", "setting"]).size()
    assert counts.max() <= 5
    assert set(a.meta["setting"]) <= {10, 20, 30}


def test_segments_parallel_equals_serial() -> None:
    images = random_images(4, seed=1)
    a = segment_elements(images, [0, 1, 2, 3], size=16, n_jobs=1)
    b = segment_elements(images, [0, 1, 2, 3], size=16, n_jobs=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    pd.testing.assert_frame_equal(a.meta, b.meta)


def test_segments_min_area_drops_small_masks() -> None:
    images = random_images(3, seed=2)
    loose = segment_elements(images, [0, 1, 2], min_area=0.0, size=16, n_jobs=1)
    strict = segment_elements(images, [0, 1, 2], min_area=0.06, size=16, n_jobs=1)
    assert (loose.meta["area_fraction"] < 0.06).any(), "test needs some small segments"
    assert (strict.meta["area_fraction"] >= 0.06).all()
    for image in images:
        for _, mask in select_segments(image, min_area=0.06):
            assert mask.mean() >= 0.06


def test_segments_no_near_duplicates() -> None:
    for image in random_images(3, seed=3) + [block_image()]:
        selected = select_segments(image, iou_threshold=0.5)
        masks = [m for _, m in selected]
        assert len(masks) >= 2
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                inter = np.logical_and(masks[i], masks[j]).sum()
                union = np.logical_or(masks[i], masks[j]).sum()
                assert inter / union <= 0.5
    # a lower threshold keeps fewer segments
    image = random_images(1, seed=4)[0]
    assert len(select_segments(image, iou_threshold=0.0)) < len(select_segments(image, iou_threshold=1.0))


def test_segment_pixels_outside_mask_are_grey() -> None:
    img = block_image()
    size = 64
    el = segment_elements([img], [0], size=size, n_jobs=1)
    selected = select_segments(img)
    assert len(selected) == len(el) > 0
    checked_outside = checked_inside = 0
    for (setting, mask), r in zip(selected, el.meta.itertuples()):
        assert setting == r.setting and mask.mean() == pytest.approx(r.area_fraction)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (r.x0, r.y0, r.x1, r.y1) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        crop_mask = mask[r.y0:r.y1, r.x0:r.x1]
        # element pixels whose source pixel is >= 3 px from the mask (beyond bicubic support) must be fill
        near = binary_dilation(crop_mask, iterations=3)
        ys = (np.arange(size) + 0.5) * crop_mask.shape[0] / size
        xs = (np.arange(size) + 0.5) * crop_mask.shape[1] / size
        far = ~near[ys.astype(int)][:, xs.astype(int)]
        element = el.images[r.element_id]
        assert (element[far] == FILL).all()
        checked_outside += int(far.sum())
        # element pixels deep inside the mask are untouched by the fill: they equal the plain resized crop
        deep = ~binary_dilation(~crop_mask, iterations=3, border_value=1)[ys.astype(int)][:, xs.astype(int)]
        plain = np.asarray(Image.fromarray(img[r.y0:r.y1, r.x0:r.x1]).resize((size, size), Image.BICUBIC))
        np.testing.assert_array_equal(element[deep], plain[deep])
        checked_inside += int(deep.sum())
    assert checked_outside > 0 and checked_inside > 0, "test needs pixels far outside and deep inside masks"


def test_segments_fill_value_is_used() -> None:
    img = block_image()
    a = segment_elements([img], [0], size=32, fill=117, n_jobs=1)
    b = segment_elements([img], [0], size=32, fill=0, n_jobs=1)
    outside = ~a.masks
    assert outside.any()
    assert (a.images[outside] != b.images[outside]).any()


def test_elements_concat_renumbers() -> None:
    p = patch_elements([block_image()], [1], size=16)
    s = segment_elements([block_image()], [2], size=16, n_jobs=1)
    both = Elements.concat([p, s])
    assert len(both) == len(p) + len(s)
    assert both.meta["element_id"].tolist() == list(range(len(both)))
    assert both.meta["kind"].tolist() == ["patch"] * len(p) + ["segment"] * len(s)
    np.testing.assert_array_equal(both.images[len(p):], s.images)
    with pytest.raises(ValueError, match="size"):
        Elements.concat([p, patch_elements([block_image()], [1], size=8)])


# --------------------------------------------------------------------------- vectors
def embeddings(n: int = 300, d: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 3.0


def test_prototype_vectors_seeded_unit_norm() -> None:
    emb = embeddings()
    a = prototype_vectors(emb, m=40, seed=1)
    b = prototype_vectors(torch.from_numpy(emb), m=40, seed=1)
    c = prototype_vectors(emb, m=40, seed=2)
    assert a.shape == (40, 24) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(40))
    assert not torch.allclose(a, c)
    idx = prototype_indices(300, 40, seed=1)
    assert len(set(idx.tolist())) == 40 and idx.max() < 300
    expected = emb[idx] / np.linalg.norm(emb[idx], axis=1, keepdims=True)
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert idx.max() > 40, "a sample, not the first M elements"


def test_cluster_vectors_deterministic_unit_norm() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 10
    emb = np.concatenate([c + rng.normal(size=(40, 8)) for c in centres]).astype(np.float32)
    c1, rep1 = cluster_vectors(emb, m=5, seed=0)
    c2, rep2 = cluster_vectors(emb, m=5, seed=0)
    torch.testing.assert_close(c1, c2)
    np.testing.assert_array_equal(rep1, rep2)
    assert c1.shape == (5, 8)
    torch.testing.assert_close(c1.norm(dim=1), torch.ones(5))
    # well-separated blobs: each true centre is matched by one concept, each representative is in its blob
    true_dirs = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert (np.abs(c1.numpy() @ true_dirs.T).max(axis=0) > 0.99).all()
    assert sorted(rep1 // 40) == list(range(5))


def test_cluster_vectors_subsample() -> None:
    emb = embeddings(n=500)
    c, reps = cluster_vectors(emb, m=10, seed=3, max_elements=100)
    assert c.shape == (10, 24) and reps.shape == (10,)
    assert reps.max() < 500 and len(set(reps.tolist())) == 10
    with pytest.raises(ValueError, match="concepts.m"):
        cluster_vectors(emb, m=101, max_elements=100)


def test_end_to_end_elements() -> None:
    emb = embeddings(n=200)
    e, ids = end_to_end_elements(emb, max_elements=50, seed=0)
    assert e.shape == (50, 24) and e.dtype == torch.float32
    ref = emb[ids] / np.linalg.norm(emb[ids].astype(np.float64), axis=1, keepdims=True)  # L2-normalised rows
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5, atol=1e-6)
    e2, ids2 = end_to_end_elements(emb, max_elements=50, seed=0)
    np.testing.assert_array_equal(ids, ids2)
    e_all, ids_all = end_to_end_elements(emb, max_elements=1000)
    np.testing.assert_array_equal(ids_all, np.arange(200))
    np.testing.assert_allclose(e_all.numpy(), emb / np.linalg.norm(emb, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_cluster_concepts_ignore_element_norms() -> None:
    """KMeans runs on L2-normalised embeddings (authors' code): rescaling elements changes nothing."""
    emb = embeddings(n=120)
    scales = np.random.default_rng(1).uniform(0.1, 50.0, size=(120, 1)).astype(np.float32)
    c1, r1 = cluster_vectors(emb, m=6, seed=0)
    c2, r2 = cluster_vectors(emb * scales, m=6, seed=0)
    np.testing.assert_allclose(c1.numpy(), c2.numpy(), atol=1e-4)
    np.testing.assert_array_equal(r1, r2)


def test_no_empty_end_to_end_concept_at_default_settings() -> None:
    """With the default number of elements, M and sweep grid, every concept of every end-to-end head
    has at least one element at initialisation (300 elements for M = 200 had left ~44 empty)."""
    import yaml

    from iis_study.core.heads import ConceptSpace, SweepParams
    from iis_study.core.heads.batched import BatchedHeads

    conf = Path(__file__).resolve().parents[2] / "conf" / "base"
    concepts = yaml.safe_load((conf / "parameters_concepts.yml").read_text())["concepts"]
    sweep = yaml.safe_load((conf / "parameters_interpretability.yml").read_text())["sweep"]
    e, m = int(concepts["end_to_end_max_elements"]), int(concepts["m"])
    elements = torch.nn.functional.normalize(torch.randn(e, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = SweepParams(
        sparsities=tuple(sweep["sparsities"]), learning_rates=tuple(sweep["learning_rates"]), seeds=tuple(sweep["seeds"])
    )
    heads = BatchedHeads(ConceptSpace("end_to_end", elements=elements, n_concepts=m), cfg, 16, 10)
    assert heads.empty_at_init.shape == (8, 3, 3)
    assert int(heads.empty_at_init.sum()) == 0
    # and the count is right: with 300 elements many concepts start empty
    few = BatchedHeads(ConceptSpace("end_to_end", elements=elements[:300], n_concepts=m), cfg, 16, 10)
    idx = torch.nn.functional.layer_norm(few.params["interp.q"], (m,)).argmax(-1)  # affine is identity at init
    expected = torch.tensor([[[m - len(set(idx[p, s, l].tolist())) for l in range(3)] for s in range(3)] for p in range(8)])
    assert torch.equal(few.empty_at_init, expected) and 20 < float(expected.float().mean()) < 70


def test_check_m_message() -> None:
    check_m(96, 96, "prototype")
    with pytest.raises(ValueError) as err:
        check_m(200, 96, "prototype")
    msg = str(err.value)
    assert "concepts.m = 200" in msg and "96" in msg and "'prototype'" in msg
    with pytest.raises(ValueError, match="concepts.m"):
        prototype_vectors(embeddings(n=10), m=11)
    with pytest.raises(ValueError, match="concepts.m"):
        check_m(0, 10, "cluster")


def test_elements_that_embed_to_zero_are_left_out_of_every_concept_type(caplog):
    """A blank element embeds to the zero vector (no direction): no concept may use it, and the
    ids the concept spaces store point at the non-zero elements of the full element list."""
    from iis_study.core.concepts.acquisition import cluster_space as cluster_concepts
    from iis_study.core.concepts.acquisition import end_to_end_space as end_to_end_concepts
    from iis_study.core.concepts.acquisition import prototype_space as prototype_concepts

    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(40, 8)).astype(np.float32))
    zero = [0, 5, 17, 39]
    emb[zero] = 0.0
    params = {"m": 36, "seed": 0, "cluster_max_elements": 1000, "end_to_end_max_elements": 1000}
    from iis_study.core.representations.features import Embeddings

    with caplog.at_level("INFO"):
        proto = prototype_concepts(Embeddings(emb), params)
    assert "4 of 40 concept elements embed to the zero vector" in caplog.text
    ids = proto.element_ids.tolist()
    assert len(ids) == 36 and not set(ids) & set(zero)  # M = 36 = every non-zero element
    assert torch.isfinite(proto.space.vectors).all()
    torch.testing.assert_close(proto.space.vectors, torch.nn.functional.normalize(emb[ids], dim=1))
    clus = cluster_concepts(Embeddings(emb), {**params, "m": 10})
    assert not set(clus.element_ids.tolist()) & set(zero) and torch.isfinite(clus.space.vectors).all()
    e2e = end_to_end_concepts(Embeddings(emb), {**params, "m": 10})
    stored = [v for k, v in e2e.to_tensors().items() if k != "__metadata__" and v.ndim == 2]
    assert stored and all(len(v) == 36 and torch.isfinite(v).all() for v in stored)
