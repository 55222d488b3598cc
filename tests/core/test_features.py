"""Batched extraction and its cache."""

from pathlib import Path

import numpy as np
import pytest
import torch

from iis_study.core.representations import features as F
from iis_study.core.representations.backbones import build
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


def test_corrupt_cache_entry_is_recomputed(rep, images, tmp_path, caplog):
    """A corrupt entry: a warning naming it, the same features recomputed, the entry rewritten."""
    good, key = F.extract_cached(rep, images, tmp_path, num_workers=0, progress=False)
    entry = tmp_path / f"{key}.safetensors"
    (entry).write_bytes(b"garbage")
    before = F.FORWARD_PASSES["count"]
    with caplog.at_level("WARNING"):
        f, _ = F.extract_cached(rep, images, tmp_path, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] > before  # recomputed, not read
    assert any(key in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), caplog.text
    torch.testing.assert_close(f.x, good.x, rtol=0, atol=0)
    reread, _ = F.load_tensors(entry)  # rewritten: a valid entry with the same values
    torch.testing.assert_close(reread["x"], good.x, rtol=0, atol=0)


def _partial_writer(real_bytes: bytes):
    """A stand-in for a file writer that writes real bytes to its target, then is interrupted."""

    def write(first, second, *a, **k):  # save_file(tensors, path) or np.save(file, array)
        target = first if hasattr(first, "write") or isinstance(first, (str, Path)) else second
        if hasattr(target, "write"):
            target.write(real_bytes)
            target.flush()
        else:
            with open(target, "wb") as fh:
                fh.write(real_bytes)
        raise KeyboardInterrupt

    return write


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    """Interrupted *partway through writing*: neither a partial file nor a temporary file remains
    (a writer that wrote straight to the final name would leave a truncated entry)."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _partial_writer(b"\x00" * 64))
    with pytest.raises(KeyboardInterrupt):
        F.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_previous_entry(tmp_path, monkeypatch):
    import safetensors.torch

    F.save_tensors(tmp_path / "x.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_writer(b"\x00" * 64))
    with pytest.raises(KeyboardInterrupt):
        F.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert F.load_tensors(tmp_path / "x.safetensors")[0]["a"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_interrupted_npy_shard_write_leaves_nothing(tmp_path, monkeypatch):
    from iis_study.core.representations import store

    monkeypatch.setattr(store.np, "save", _partial_writer(b"\x93NUMPY" + b"\x00" * 64))
    with pytest.raises(KeyboardInterrupt):
        store.atomic_save_npy(tmp_path / "x.00000.npy", np.zeros((4, 3), np.float32))
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


_KILLED_CHILD = r"""
import sys, time
import numpy as np
from iis_study.core.representations import features as F
from iis_study.core.representations.backbones import build
from iis_study.core.data import array_image_set

cache = sys.argv[1]
rep = build({"model": "tf_efficientnet_lite0", "weights": "offline", "input_size": 32}, name="lite0")
rng = np.random.default_rng(0)
images = array_image_set(rng.integers(0, 255, size=(10, 16, 16, 3), dtype=np.uint8), labels=np.arange(10) % 2)
from iis_study.core.representations import store
real_save = store.np.save

def half_then_hang(fh, arr, *a, **kw):
    if ".x.00001.npy." in getattr(fh, "name", ""):  # the second shard: half of its bytes, then hang (killed here)
        import io
        buf = io.BytesIO()
        real_save(buf, arr, *a, **kw)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        print("mid-shard", flush=True)
        time.sleep(600)
    return real_save(fh, arr, *a, **kw)

store.np.save = half_then_hang
F.extract_sharded_cached(rep, images, cache, shard_rows=4, batch_size=2, num_workers=0, progress=False)
"""


@pytest.mark.slow
def test_sharded_extraction_killed_mid_shard_resumes_byte_identical(rep, images, tmp_path, caplog):
    """A real process SIGKILLed while the second shard's bytes are half written: only the complete
    shard is adopted, the half-written file is removed, the resumed extraction logs where it
    resumes and extracts only the images after the complete shard, and its features are
    byte-identical to an uninterrupted extraction."""
    import signal
    import subprocess
    import sys

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(killed)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # other output may come first
            if line.strip() == "mid-shard":
                break
        else:
            raise AssertionError("the child process never reached the second shard")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    store = next(killed.glob("*.shards"))
    assert sorted(p.name for p in store.glob("x.*.npy")) == ["x.00000.npy"] and not (store / "manifest.json").exists()
    assert len(list(store.glob(".x.00001.npy.*.tmp"))) == 1  # the half-written shard, under a temporary name

    calls = []
    real = F.extract_batches

    def counting(rep_, imgs, *a, **kw):
        calls.append(len(imgs))
        yield from real(rep_, imgs, *a, **kw)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", logger="iis_study.core.representations.features"):
        mp.setattr(F, "extract_batches", counting)
        x, _, ok, _ = F.extract_sharded_cached(rep, images, killed, shard_rows=4, batch_size=2, num_workers=0,
                                               progress=False)
    assert calls == [6]  # the 4 rows of the complete shard are not extracted again
    assert "resuming at image 4 of 10 (1 shards on disk)" in caplog.text
    fresh, _, _, _ = F.extract_sharded_cached(rep, images, tmp_path / "fresh", shard_rows=4, batch_size=2,
                                              num_workers=0, progress=False)
    assert ok.all() and torch.equal(x.to_tensor(), fresh.to_tensor())  # byte-identical
    assert not list(store.glob(".*.tmp"))
