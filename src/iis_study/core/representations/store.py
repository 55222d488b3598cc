"""Out-of-core feature storage: rows of a 2-D array in ``.npy`` shards, read memory-mapped.

A feature matrix of ImageNet size (1.28 M x 1280 float32 = 6.6 GB per backbone) does not have to
fit in memory. :class:`ShardWriter` appends rows and writes one ``.npy`` file per ``shard_rows``
rows (each written to a temporary name and renamed), then a ``manifest.json`` that marks the store
complete. :class:`ShardedArray` reads it back: one shard at a time through ``numpy.load(...,
mmap_mode="r")``, so a reader holds at most the rows it asked for, whatever the number of rows.

Storage may be float16 (half the disk and page cache); reads always return float32 tensors, so
the computation is the same float32 code either way.

An interrupted writer leaves its complete shards behind; a new writer on the same folder with
``resume=True`` keeps them and reports ``rows_done``, so extraction restarts at the first missing
shard instead of at image 0.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _shard_name(i: int) -> str:
    return f"x.{i:05d}.npy"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` if the block finishes, removed otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def check_storage(dtype: str, shard_rows: int) -> None:
    """Raise ``ValueError`` naming the parameter when the storage settings are invalid."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"extraction.storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if int(shard_rows) < 1:
        raise ValueError(f"extraction.shard_rows must be >= 1, got {shard_rows}")


class ShardWriter:
    """Append rows of a ``(N, dim)`` array; one ``.npy`` file per ``shard_rows`` rows.

    With ``resume=True`` complete shards already in ``root`` (from an interrupted run with the
    same settings) are kept: :attr:`rows_done` rows need not be produced again, and the caller
    appends from row ``rows_done`` on.
    """

    def __init__(self, root: str | Path, dim: int, dtype: str = "float32", shard_rows: int = 65536, resume: bool = True):
        check_storage(dtype, shard_rows)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        self.dtype = dtype
        self.shard_rows = int(shard_rows)
        self._np_dtype = STORAGE_DTYPES[dtype]
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[int] = []  # rows per written shard
        if resume:
            self._adopt_existing()
        else:
            for p in self.root.glob("x.*.npy"):
                p.unlink()

    def _adopt_existing(self) -> None:
        settings = self.root / ".settings.json"
        wanted = {"dim": self.dim, "dtype": self.dtype, "shard_rows": self.shard_rows}
        if settings.is_file() and json.loads(settings.read_text()) == wanted:
            i = 0
            while (self.root / _shard_name(i)).is_file():
                try:
                    arr = np.load(self.root / _shard_name(i), mmap_mode="r")
                except Exception:  # a damaged shard and everything after it are redone
                    break
                if arr.shape != (self.shard_rows, self.dim) or arr.dtype != self._np_dtype:
                    break
                self.shards.append(self.shard_rows)
                i += 1
        for p in self.root.glob("x.*.npy"):
            if int(p.name.split(".")[1]) >= len(self.shards):
                p.unlink()
        for p in self.root.glob(".*.tmp"):  # files half written when a process was killed (write-then-rename)
            p.unlink()
        _atomic_write_json(settings, wanted)

    @property
    def rows_done(self) -> int:
        """Rows already on disk in complete shards."""
        return int(sum(self.shards))

    def append(self, rows: np.ndarray | torch.Tensor) -> None:
        """Add rows (converted to the storage dtype); full shards are written at once."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().float().numpy()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (n, {self.dim}), got {rows.shape}")
        self._buffer.append(rows.astype(self._np_dtype, copy=False))
        self._buffered += rows.shape[0]
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        block = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        atomic_save_npy(self.root / _shard_name(len(self.shards)), np.ascontiguousarray(block[:n]))
        self.shards.append(n)
        rest = block[n:]
        self._buffer = [rest] if rest.shape[0] else []
        self._buffered = rest.shape[0]

    def close(self, metadata: dict[str, Any] | None = None) -> ShardedArray:
        """Write the last (partial) shard and the manifest; returns the finished array."""
        if self._buffered:
            self._flush(self._buffered)
        manifest = {
            "shape": [self.rows_done, self.dim],
            "dtype": self.dtype,
            "shards": [{"file": _shard_name(i), "rows": r} for i, r in enumerate(self.shards)],
            "metadata": metadata or {},
        }
        _atomic_write_json(self.root / MANIFEST, manifest)
        return ShardedArray(self.root)


class ShardedArray:
    """A read-only ``(N, D)`` array stored as ``.npy`` shards; reads return float32 tensors.

    Indexing (``a[idx]`` with an int, slice, array or tensor of row numbers) reads only the
    shards that hold the rows asked for, each through a short-lived memory map. ``rows`` (sorted
    row numbers) restricts the array to a subset of the stored rows without copying anything,
    e.g. to leave out images that could not be read.
    """

    def __init__(self, root: str | Path, rows: np.ndarray | None = None):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a complete feature store (no {MANIFEST}); re-run extraction")
        self.manifest = json.loads(path.read_text())
        self.storage_dtype = str(self.manifest["dtype"])
        self._files = [s["file"] for s in self.manifest["shards"]]
        sizes = np.asarray([int(s["rows"]) for s in self.manifest["shards"]], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.stored_rows, self.dim = (int(v) for v in self.manifest["shape"])
        if int(self._offsets[-1]) != self.stored_rows:
            raise ValueError(f"{path}: shard sizes add up to {int(self._offsets[-1])} rows, not {self.stored_rows}")
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= self.stored_rows)):
                raise ValueError(f"rows must be 1-D row numbers in [0, {self.stored_rows})")
            if rows.size > 1 and np.any(np.diff(rows) <= 0):
                raise ValueError("rows must be strictly increasing")
        self.rows = rows

    # -- array protocol ------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.dim))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        """The dtype reads come back in (always float32)."""
        return torch.float32

    def __len__(self) -> int:
        return self.stored_rows if self.rows is None else int(self.rows.size)

    def __repr__(self) -> str:
        return f"ShardedArray({str(self.root)!r}, shape={tuple(self.shape)}, storage={self.storage_dtype}, shards={len(self._files)})"

    def select(self, keep: np.ndarray | torch.Tensor) -> ShardedArray:
        """The rows where the boolean ``keep`` is true (a view; nothing is copied)."""
        keep = np.asarray(keep.numpy() if isinstance(keep, torch.Tensor) else keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep must have shape ({len(self)},), got {keep.shape}")
        base = np.arange(self.stored_rows) if self.rows is None else self.rows
        return ShardedArray(self.root, rows=base[keep])

    def _stored(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def _read_stored(self, stored: np.ndarray) -> np.ndarray:
        """Rows at stored row numbers ``stored`` (any order), as float32, shard by shard."""
        out = np.empty((stored.size, self.dim), dtype=np.float32)
        if stored.size == 0:
            return out
        shard = np.searchsorted(self._offsets, stored, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            mm = np.load(self.root / self._files[int(s)], mmap_mode="r")
            local = stored[where] - self._offsets[s]
            if local.size and np.all(np.diff(local) == 1):
                out[where] = mm[int(local[0]) : int(local[-1]) + 1]
            else:
                out[where] = mm[local]
            del mm  # unmap now: a reader keeps no pages of shards it is done with
        return out

    def __getitem__(self, idx: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, slice):
            positions = np.arange(n)[idx]
        elif np.isscalar(idx) or (isinstance(idx, np.ndarray) and idx.ndim == 0):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {n} rows")
            return torch.from_numpy(self._read_stored(self._stored(np.asarray([i % n]))))[0]
        else:
            positions = np.asarray(idx)
            if positions.dtype == bool:
                positions = np.flatnonzero(positions)
            positions = positions.astype(np.int64)
            if positions.size and (positions.min() < -n or positions.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
            positions = positions % max(n, 1)
        return torch.from_numpy(self._read_stored(self._stored(positions)))

    # -- streaming -------------------------------------------------------------------------
    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` ranges of positions, one per shard (empty shards left out)."""
        if self.rows is None:
            bounds = self._offsets
        else:
            bounds = np.searchsorted(self.rows, self._offsets, side="left")
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Positions ``[start, stop)`` as a float32 tensor."""
        return torch.from_numpy(self._read_stored(self._stored(np.arange(start, stop, dtype=np.int64))))

    def iter_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, rows)`` per shard, in order; one shard in memory at a time."""
        for a, b in self.blocks():
            yield a, self.read(a, b)

    def to_tensor(self) -> torch.Tensor:
        """Every row in memory (float32): only for arrays known to be small."""
        return self.read(0, len(self))

    def files(self) -> list[Path]:
        return [self.root / f for f in self._files] + [self.root / MANIFEST]


def link_or_copy(src: ShardedArray, dest: str | Path) -> ShardedArray:
    """The store of ``src`` under ``dest`` (hard links where possible, else copies), same rows."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.files():
        target = dest / f.name
        if target.exists():
            target.unlink()
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    if src.rows is not None:
        np.save(dest / "rows.npy", src.rows)
    return ShardedArray(dest, rows=src.rows)


def open_store(root: str | Path) -> ShardedArray:
    """Open a store written by :func:`link_or_copy` (restores its row subset)."""
    root = Path(root)
    rows = np.load(root / "rows.npy") if (root / "rows.npy").is_file() else None
    return ShardedArray(root, rows=rows)
