"""Seeds, initialisation and data order of the heads.

Every random choice of a head -- its initial parameters, its seed's data order, its Gumbel
noise -- comes from a ``torch.Generator`` seeded by :func:`derive_seed` from the head's
identity, so that the batched sweep and the single-head reference
(:func:`~iis_study.core.heads.train_single_head`) draw the same numbers. Sharded (on-disk)
splits are read shard by shard (:func:`shard_batches`, :func:`eval_chunks`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..representations.store import ShardedArray
from .datatypes import HeadKind, Split

_EVAL_CHUNK = 1024
Q_INIT_STD = 0.02  # end-to-end assignment logits q: truncated normal, std 0.02 (authors' code)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (e.g. seed and head identity)."""
    text = "|".join(_canonical(p) for p in parts)
    digest = hashlib.sha256(f"iis_study|{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _canonical(part: object) -> str:
    if isinstance(part, (float, np.floating)):
        return repr(float(part))
    if isinstance(part, (int, np.integer)):
        return str(int(part))
    return str(part)


def _head_init_seed(seed: int, head: HeadKind, sparsity: float | None, lr: float) -> int:
    return derive_seed("init", int(seed), head, float("nan") if sparsity is None else sparsity, lr)


def gumbel_seed(seed: int, sparsity: float, lr: float) -> int:
    return derive_seed("gumbel", int(seed), float(sparsity), float(lr))


def data_seed(seed: int) -> int:
    return derive_seed("data", int(seed))


def generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def init_head(
    head: HeadKind,
    seed: int,
    sparsity: float | None,
    lr: float,
    d_in: int,
    num_classes: int,
    n_elements: int | None,
    device: str,
) -> dict[str, torch.Tensor]:
    """Initial parameters of one head (``nn.Linear`` default distribution).

    End-to-end heads: ``q`` from a truncated normal with std 0.02 (``nn.init.trunc_normal_``, as
    the authors' code), and the affine of the LayerNorm on ``q`` (ones, zeros).
    """
    gen = generator(_head_init_seed(seed, head, sparsity, lr), "cpu")
    bound = 1.0 / math.sqrt(d_in)
    out = {
        "weight": torch.empty(num_classes, d_in).uniform_(-bound, bound, generator=gen),
        "bias": torch.empty(num_classes).uniform_(-bound, bound, generator=gen),
    }
    if head == "interp":
        out["ln_weight"] = torch.ones(d_in)
        out["ln_bias"] = torch.zeros(d_in)
        if n_elements is not None:
            out["q"] = nn.init.trunc_normal_(torch.empty(n_elements, d_in), std=Q_INIT_STD, generator=gen)
            out["q_ln_weight"] = torch.ones(d_in)
            out["q_ln_bias"] = torch.zeros(d_in)
    return {k: v.to(device) for k, v in out.items()}


def to_device(split: Split, device: str) -> Split:
    """Labels (and in-memory features) on ``device``; sharded features stay on disk."""
    y = split.y.to(device=device, dtype=torch.long)
    if isinstance(split.x, ShardedArray):
        return Split(split.x, y)
    return Split(split.x.to(device=device, dtype=torch.float32), y)


def shard_batches(
    x: ShardedArray, y: torch.Tensor, gen: torch.Generator, batch_size: int, device: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches ``(x, y)`` of a sharded split for one seed.

    The data order: the shards in a random order, and the rows of each shard in a random
    order (rows left over at the end of a shard open the next batch). Only the shard being
    read (plus fewer than ``batch_size`` leftover rows) is in memory. With a single shard this
    is exactly the in-memory order ``randperm(N)``.
    """
    blocks = x.blocks()
    order = torch.randperm(len(blocks), generator=gen).tolist() if len(blocks) > 1 else [0]
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for b in order:
        start, stop = blocks[b]
        perm = torch.randperm(stop - start, generator=gen)
        rows = x.read(start, stop).to(device)  # the one shard in memory; batches are gathered from it
        labels = y[start:stop].to(device)
        perm = perm.to(device)
        pos = 0
        if carry is not None:  # rows left over from the previous shard open this shard's first batch
            take = perm[: batch_size - carry[0].shape[0]]
            pos = take.shape[0]
            xb, yb = torch.cat([carry[0], rows[take]]), torch.cat([carry[1], labels[take]])
            if xb.shape[0] < batch_size:
                carry = (xb, yb)
                continue
            carry = None
            yield xb, yb
        while pos + batch_size <= perm.shape[0]:
            take = perm[pos : pos + batch_size]
            pos += batch_size
            yield rows[take], labels[take]
        if pos < perm.shape[0]:
            take = perm[pos:]
            carry = (rows[take], labels[take])
        del rows
    if carry is not None:
        yield carry


def eval_chunks(x: torch.Tensor | ShardedArray) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, rows)`` chunks of at most ``_EVAL_CHUNK`` rows, in order (shard by shard)."""
    if isinstance(x, ShardedArray):
        for start, rows in x.iter_blocks():
            for i in range(0, rows.shape[0], _EVAL_CHUNK):
                yield start + i, rows[i : i + _EVAL_CHUNK]
    else:
        for i in range(0, x.shape[0], _EVAL_CHUNK):
            yield i, x[i : i + _EVAL_CHUNK]


def train_mean(x: torch.Tensor | ShardedArray, device: str) -> torch.Tensor:
    """Mean of the training features (D,), accumulated in float64 (shard by shard on disk)."""
    if isinstance(x, ShardedArray):
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for _, rows in x.iter_blocks():
            total += torch.as_tensor(rows).to(torch.float64).sum(0)
        return (total / x.shape[0]).to(device=device, dtype=torch.float32)
    return x.to(torch.float64).mean(0).to(torch.float32)
