"""Out-of-core features: shard writer/reader and the sweep streaming from shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iis_study.core.heads import ConceptSpace, Split, SweepParams, sweep, train_single_head
from iis_study.core.representations.store import ShardedArray, ShardWriter, link_or_copy, open_store


def _write(root, x: torch.Tensor, shard_rows: int, dtype: str = "float32", chunk: int = 7) -> ShardedArray:
    w = ShardWriter(root, x.shape[1], dtype=dtype, shard_rows=shard_rows, resume=False)
    for i in range(0, x.shape[0], chunk):
        w.append(x[i : i + chunk])
    return w.close()


def test_roundtrip_shards_and_indexing(tmp_path):
    x = torch.randn(53, 6)
    a = _write(tmp_path / "s", x, shard_rows=10)
    assert a.shape == (53, 6) and len(a.blocks()) == 6
    assert sorted(p.name for p in (tmp_path / "s").glob("x.*.npy")) == [f"x.{i:05d}.npy" for i in range(6)]
    torch.testing.assert_close(a.to_tensor(), x, rtol=0, atol=0)
    idx = torch.tensor([52, 0, 11, 11, 30, 9])
    torch.testing.assert_close(a[idx], x[idx], rtol=0, atol=0)
    torch.testing.assert_close(a[3:25:4], x[3:25:4], rtol=0, atol=0)
    torch.testing.assert_close(a[-1], x[-1], rtol=0, atol=0)
    with pytest.raises(IndexError):
        a[torch.tensor([53])]


def test_float16_storage_reads_float32(tmp_path):
    x = torch.randn(20, 4)
    a = _write(tmp_path / "h", x, shard_rows=8, dtype="float16")
    out = a.to_tensor()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.half().float(), rtol=0, atol=0)
    assert np.load(tmp_path / "h" / "x.00000.npy").dtype == np.float16


def test_select_and_link_keep_row_subset(tmp_path):
    x = torch.randn(25, 3)
    a = _write(tmp_path / "s", x, shard_rows=10)
    keep = torch.ones(25, dtype=torch.bool)
    keep[[0, 12, 24]] = False
    sub = a.select(keep)
    torch.testing.assert_close(sub.to_tensor(), x[keep], rtol=0, atol=0)
    assert [b - a_ for a_, b in sub.blocks()] == [9, 9, 4]
    linked = open_store(link_or_copy(sub, tmp_path / "linked").root)
    torch.testing.assert_close(linked.to_tensor(), x[keep], rtol=0, atol=0)


def test_writer_resumes_complete_shards(tmp_path):
    x = torch.randn(35, 5)
    w = ShardWriter(tmp_path / "r", 5, shard_rows=10)
    w.append(x[:23])  # two full shards written, 3 rows buffered and lost ("interrupted")
    assert w.rows_done == 20
    w2 = ShardWriter(tmp_path / "r", 5, shard_rows=10)
    assert w2.rows_done == 20
    w2.append(x[20:])
    torch.testing.assert_close(w2.close().to_tensor(), x, rtol=0, atol=0)
    # other settings: nothing is reused
    assert ShardWriter(tmp_path / "r", 5, shard_rows=8).rows_done == 0


def test_bad_storage_settings_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="extraction.storage_dtype"):
        ShardWriter(tmp_path / "b", 3, dtype="int8")
    with pytest.raises(ValueError, match="extraction.shard_rows"):
        ShardWriter(tmp_path / "b", 3, shard_rows=0)


# --------------------------------------------------------------------------- streaming sweep


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(5)
    centers = 1.2 * torch.randn(4, 16, generator=g)

    def blobs(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return Split(centers[y] + 1.5 * torch.randn(n, 16, generator=g), y)

    return blobs(230), blobs(90), blobs(90), F.normalize(torch.randn(10, 16, generator=g), dim=1)


def _sharded(tmp_path, split: Split, name: str, rows: int) -> Split:
    return Split(_write(tmp_path / name, split.x, shard_rows=rows), split.y)


CFG = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-2,), seeds=(0, 1), epochs=3, batch_size=32)


def test_sharded_sweep_matches_single_head_reference(tmp_path, problem):
    train, val, test, vectors = problem
    # 50-row shards: batches straddle shard boundaries; the last batch is partial
    tr, va, te = (_sharded(tmp_path, s, n, 50) for s, n in ((train, "tr"), (val, "va"), (test, "te")))
    concepts = ConceptSpace("vectors", vectors=vectors)
    result = sweep(tr, va, te, concepts, 4, CFG, progress=False)
    for head, sp in (("probe", None), ("interp", 0.5)):
        ref = train_single_head(tr, va, te, concepts, 4, head=head, seed=1, lr=1e-2, sparsity=sp, config=CFG)
        h = result.history
        sel = (h["head"] == head) & (h["seed"] == 1)
        sel &= h["sparsity"].isna() if sp is None else np.isclose(h["sparsity"], sp)
        np.testing.assert_allclose(h[sel].sort_values("epoch")["val_acc"], ref.val_curve, atol=1 / 90 + 1e-9)


def test_single_shard_stream_equals_in_memory_order(tmp_path, problem):
    train, val, test, vectors = problem
    concepts = ConceptSpace("vectors", vectors=vectors)
    mem = sweep(train, val, test, concepts, 4, CFG, progress=False)
    one = sweep(_sharded(tmp_path, train, "one", 10_000), val, test, concepts, 4, CFG, progress=False)
    np.testing.assert_allclose(one.history["val_acc"], mem.history["val_acc"], atol=1 / 90 + 1e-9)
    np.testing.assert_allclose(one.table["test_acc"], mem.table["test_acc"], atol=1 / 90 + 1e-9)


def test_shard_order_changes_with_seed_and_epoch(tmp_path, problem):
    from iis_study.core.heads.seeds import shard_batches

    train = _sharded(tmp_path, problem[0], "ord", 50)
    g = torch.Generator().manual_seed(0)
    e1 = torch.cat([y for _, y in shard_batches(train.x, train.y, g, 32, "cpu")])
    e2 = torch.cat([y for _, y in shard_batches(train.x, train.y, g, 32, "cpu")])
    assert e1.shape == e2.shape == (230,)
    assert not torch.equal(e1, e2)
    assert torch.equal(e1.sort().values, train.y.sort().values)  # every row once per epoch
