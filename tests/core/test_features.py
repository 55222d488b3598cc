"""Batched extraction and its cache."""

import numpy as np
import pytest
import torch

from iis_study.core import features as F
from iis_study.core.backbones import build
from iis_study.core.data import BadImageError, array_image_set, load_dataset


@pytest.fixture(scope="module")
def rep():
    return build({"model": "tf_efficientnet_lite0", "weights": "offline", "input_size": 32}, name="lite0")


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return array_image_set(rng.integers(0, 255, size=(10, 16, 16, 3), dtype=np.uint8), labels=np.arange(10) % 2)


def test_extract_matches_direct_forward_and_keeps_order(rep, images):
    f = F.extract(rep, images, batch_size=4, num_workers=0, progress=False)
    assert f.x.shape == (10, 1280) and f.x.dtype == torch.float32
    assert f.y.tolist() == (np.arange(10) % 2).tolist()
    from PIL import Image

    one = np.asarray(Image.fromarray(images.load(7)).resize((32, 32), Image.BICUBIC))
    direct = rep.forward_uint8(torch.from_numpy(one.copy()).permute(2, 0, 1)[None])
    torch.testing.assert_close(f.x[7], direct[0], rtol=1e-4, atol=1e-4)


def test_workers_give_the_same_features(rep, images):
    a = F.extract(rep, images, batch_size=3, num_workers=0, progress=False)
    b = F.extract(rep, images, batch_size=3, num_workers=2, progress=False)
    torch.testing.assert_close(a.x, b.x)


def test_second_extraction_is_a_cache_hit_without_forward(rep, images, tmp_path):
    before = F.FORWARD_PASSES["count"]
    a, key = F.extract_cached(rep, images, tmp_path, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] > before
    mid = F.FORWARD_PASSES["count"]
    b, key2 = F.extract_cached(rep, images, tmp_path, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] == mid  # no forward pass on a cache hit
    assert key == key2
    torch.testing.assert_close(a.x, b.x)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.safetensors"]  # no temporary files left


def test_corrupt_cache_entry_is_recomputed(rep, images, tmp_path):
    _, key = F.extract_cached(rep, images, tmp_path, num_workers=0, progress=False)
    (tmp_path / f"{key}.safetensors").write_bytes(b"garbage")
    f, _ = F.extract_cached(rep, images, tmp_path, num_workers=0, progress=False)
    assert f.x.shape == (10, 1280)


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        F.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_is_named_or_skipped(rep, tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"nope")
    ds = load_dataset({"kind": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(BadImageError, match="broken.png"):
        F.extract(rep, ds, num_workers=0, progress=False)
    f = F.extract(rep, ds, num_workers=0, progress=False, on_bad_image="skip")
    assert f.ok.tolist() == [True, True, False]


def test_sharded_extraction_matches_in_memory_and_hits_the_cache(rep, images, tmp_path):
    mem = F.extract(rep, images, batch_size=4, num_workers=0, progress=False)
    x, y, ok, key = F.extract_sharded_cached(
        rep, images, tmp_path, shard_rows=3, batch_size=4, num_workers=0, progress=False
    )
    assert len(x.blocks()) == 4 and ok.all() and y.tolist() == mem.y.tolist()
    torch.testing.assert_close(x.to_tensor(), mem.x, rtol=0, atol=0)
    before = F.FORWARD_PASSES["count"]
    x2, *_ = F.extract_sharded_cached(rep, images, tmp_path, shard_rows=3, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] == before and x2.root == x.root
    h, *_ = F.extract_sharded_cached(
        rep, images, tmp_path, storage_dtype="float16", shard_rows=3, num_workers=0, progress=False
    )
    torch.testing.assert_close(h.to_tensor(), mem.x.half().float(), rtol=0, atol=0)


def test_interrupted_sharded_extraction_resumes_at_the_first_missing_shard(rep, images, tmp_path, monkeypatch):
    seen = []
    real = F.extract_batches

    def dying(rep_, imgs, *a, **kw):
        for i, out in enumerate(real(rep_, imgs, *a, **kw)):
            seen.append(len(imgs))
            if i == 2:  # 2 batches of 2 images appended: one full shard of 3 rows is on disk
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(F, "extract_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        F.extract_sharded_cached(rep, images, tmp_path, shard_rows=3, batch_size=2, num_workers=0, progress=False)
    store = next(tmp_path.glob("*.shards"))
    assert not (store / "manifest.json").exists()
    assert sorted(p.name for p in store.glob("x.*.npy")) == ["x.00000.npy"]  # rows 0-2 (row 3-5 incomplete)
    monkeypatch.setattr(F, "extract_batches", real)
    calls = []

    def counting(rep_, imgs, *a, **kw):
        calls.append(len(imgs))
        yield from real(rep_, imgs, *a, **kw)

    monkeypatch.setattr(F, "extract_batches", counting)
    x, _, ok, _ = F.extract_sharded_cached(rep, images, tmp_path, shard_rows=3, batch_size=2, num_workers=0, progress=False)
    assert calls == [7]  # only the 7 images after the complete shard are extracted again
    mem = F.extract(rep, images, batch_size=4, num_workers=0, progress=False)
    torch.testing.assert_close(x.to_tensor(), mem.x, rtol=1e-5, atol=1e-5)
    assert ok.all() and not list(store.glob(".*.tmp"))
