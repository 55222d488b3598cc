"""The one place a ``device`` parameter (``auto`` | ``cpu`` | ``cuda`` | ``cuda:<n>``) is checked and resolved, and
the CPU's pool of single-threaded solver workers (:func:`worker_pool`)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits


def check_device(requested: object, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``requested`` is ``auto``, ``cpu`` or ``cuda[:n]`` (CUDA present)."""
    if requested in (None, "auto", "cpu"):
        return
    if isinstance(requested, str) and (requested == "cuda" or requested.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ValueError(f"{where} = {requested!r}, but this machine has no CUDA GPU; use 'cpu' or 'auto'")
        return
    raise ValueError(f"{where} must be 'auto', 'cpu' or 'cuda', got {requested!r}")


def resolve_device(requested: object = "auto", where: str = "device") -> str:
    """``auto`` (or None) -> ``cuda`` when a GPU is present, else ``cpu``; anything else checked and returned."""
    check_device(requested, where)
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(requested)


def check_workers(workers: object) -> None:
    """``ValueError`` unless ``workers`` is None (one per torch thread) or a positive integer."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")


def _one_thread() -> None:
    # a thread's first torch call reads the process-wide count (which another thread may set at any time): make
    # that call first, then pin this thread to one
    torch.get_num_threads()
    torch.set_num_threads(1)


@contextmanager
def worker_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` Python threads (default: ``torch.get_num_threads()``), each running torch on one
    thread: independent small solves (one head, one path) submitted one per call keep their data in cache and round
    the same whatever the pool's size. On exit, queued work is cancelled (an error or Ctrl-C in one job does not
    wait for the rest), and the calling thread's count is set again: ``torch.set_num_threads`` also writes the
    process-wide count that threads started later begin with. While the pool is open, numpy's and scipy's BLAS
    run on one thread (threadpoolctl), restored on exit."""
    check_workers(workers)
    threads = torch.get_num_threads()
    # numpy's and scipy's BLAS (the Newton solver's compiled kernels call scipy's) on one thread too. threadpoolctl
    # limits only the libraries loaded when it is called, and scipy ships its own OpenBLAS: load it first
    import scipy.linalg.cython_blas  # noqa: F401

    blas = threadpool_limits(1, user_api="blas")
    try:
        pool = ThreadPoolExecutor(workers or threads, initializer=_one_thread)
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        blas.restore_original_limits()
        torch.set_num_threads(threads)
