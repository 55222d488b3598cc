"""Brute-force references shared by the unit tests."""

from __future__ import annotations

import torch


def ranked_keep(a: torch.Tensor, k: int) -> torch.Tensor:
    """Reference keep-mask: rank by (-|a|, index), keep the first M - k (one row at a time)."""
    m = a.shape[-1]
    rows = a.reshape(-1, m).tolist()
    keep = torch.zeros(len(rows), m, dtype=torch.bool)
    for r, row in enumerate(rows):
        order = sorted(range(m), key=lambda j: (-abs(row[j]), j))
        keep[r, order[: m - k]] = True
    return keep.reshape(a.shape)
