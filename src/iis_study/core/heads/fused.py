"""Fused numba CPU kernel for the batched interpretation heads (METHOD §3).

``masks.InterpHeads`` computes, for every head ``h`` and sample row ``b``::

    a      = ln_bias + base * ln_weight        (or a = base without affine)
    keep   = the M - k entries of largest |a|  (exactly M - k; among equal |a| the
             lower index is kept first)
    sparse = a * keep
    logits = sparse @ weight.T + bias

and the gradients of a loss given ``d loss / d logits``. The torch implementation makes
about ten passes over full-size ``(H, B, M)`` tensors plus a numpy partition per head;
here every ``(head, row)`` is handled start to end with its ``M`` values in cache. The
forward pass saves only what the backward pass needs to rebuild the mask (8 bytes a row:
the threshold and a tie code; the kept indices for sparse-path heads); the backward
pass recomputes ``a``.

Selection: the ``(k+1)``-th smallest ``|a|`` of a row is bracketed by counting passes
``#(|a| <= g)`` (vectorised) at probes ``g`` handled as float bit patterns (integers,
monotone in ``g`` for ``g >= 0``), starting from the previous row's threshold of the same
head and narrowing by interpolation/bisection. It stops as soon as a probe has exactly
``k`` entries at or below it; otherwise the threshold value is exact and ties are broken
by index, so exactly ``M - k`` entries are kept, as in ``masks.keep_mask``.

Heads that keep few entries (at most ``SPARSE_FRAC * M``, with K <= 16) take a sparse
path: the kept indices are compacted (AVX-512 ``vpcompressd``) and the logits and
gradients touch only those, with the weight transposed and padded to 16 classes.

Parallelism: ``prange`` over heads (each head's gradients are accumulated by one thread,
so there are no races and the result does not depend on the thread count); the number
of threads follows ``torch.get_num_threads()``. Gradient sums over the rows are
accumulated in float32 blocks of ``_BLOCK`` rows and the blocks in float64.

The kernel is used by :class:`iis_study.core.heads.masks.InterpHeads` on CPU float32
tensors when numba imports; ``IIS_FUSED=0`` in the environment disables it. Rows with
NaN activations give unspecified (but memory-safe) results, as in the torch path.

This module is the Python side (flattening the inputs, threads, the lock, calling the
kernels); the numba kernels are in :mod:`.fused_kernels`, the LLVM intrinsics they use
in :mod:`.fused_intrinsics`.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

try:  # numba is optional: without it the torch path is used
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

from .fused_kernels import KP, SPARSE_FRAC

if numba is not None:
    from .fused_kernels import backward_kernel, cross_entropy_kernel, forward_kernel

_LOCK = threading.Lock()  # one kernel at a time (numba's workqueue layer is not thread-safe)
_FORK_UNSAFE = False  # set in a forked child whose parent had started numba's GNU OpenMP pool


def enabled() -> bool:
    """Whether the fused kernel may be used: numba imports, ``IIS_FUSED`` is not ``0`` and
    this is not a forked child of a process that used numba's OpenMP threads."""
    if numba is None or _FORK_UNSAFE:
        return False
    return os.environ.get("IIS_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def _after_fork_in_child() -> None:
    """numba terminates a forked child that launches a parallel kernel when the parent
    had started the GNU OpenMP threading layer; such children use the torch path."""
    global _FORK_UNSAFE, _LOCK
    _LOCK = threading.Lock()  # a parent thread may have held it at the fork
    try:
        _FORK_UNSAFE = _FORK_UNSAFE or numba.threading_layer() == "omp"
    except ValueError:  # no threading layer started in the parent
        pass


if numba is not None:
    # The threading layer is numba's default choice (tbb, else omp, else workqueue). On a
    # 2-core VM the OpenMP layer ran the kernel twice as fast as the workqueue layer inside
    # the sweep (whose sleeping workers kept the two heads' halves from overlapping).
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- python side


@dataclass
class Plan:
    """Inputs of one call flattened to ``H`` heads (views where possible)."""

    lead: tuple[int, ...]  # broadcast leading shape (G, ...) of the heads
    n_rows: int  # B
    base3: torch.Tensor  # (Hb, B, M) contiguous
    base_idx: torch.Tensor  # (H,) int64: head -> slice of base3
    affine: bool  # whether ln_weight / ln_bias are given
    lnw2: torch.Tensor  # (H, M) (zeros without affine)
    lnb2: torch.Tensor
    weight3: torch.Tensor  # (H, K, M)
    bias2: torch.Tensor  # (H, K)
    ks: np.ndarray  # (H,) int64


def _broadcast(shapes) -> tuple[int, ...] | None:
    """numpy broadcasting of ``shapes`` (``None`` if incompatible); ``torch.broadcast_shapes``
    would import sympy on its first call (0.3 s)."""
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*(tuple(sh) for sh in shapes)))
    except ValueError:
        return None


def plan(base, ln_weight, ln_bias, weight, bias, ks) -> Plan | None:
    """Flatten the inputs of ``InterpHeads`` for the kernel, or ``None`` when it does not apply
    (kernel disabled or unavailable, a tensor not CPU float32, unusual broadcasting)."""
    if not enabled():
        return None
    affine = ln_weight is not None
    tensors = [base, weight, bias] + ([ln_weight, ln_bias] if affine else [])
    if affine and ln_bias is None:
        return None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != torch.float32:
            return None
    if base.ndim < 2 or weight.ndim < 2 or bias.ndim < 1:
        return None
    n_rows, m = base.shape[-2:]
    n_cls = weight.shape[-2]
    if weight.shape[-1] != m or bias.shape[-1] != n_cls or not 1 <= m < 2**24 or n_rows < 1:
        return None  # (counts are summed in float32: exact below 2^24)
    shapes = [base.shape[:-2], weight.shape[:-2], bias.shape[:-1]]
    if affine:
        for t in (ln_weight, ln_bias):
            if t.ndim < 2 or t.shape[-1] != m or t.shape[-2] != 1:
                return None
            shapes.append(t.shape[:-2])
    lead = _broadcast(shapes)
    if lead is None:
        return None
    if len(lead) < 1 or lead[0] != len(ks) or lead[0] < 1:
        return None
    n_heads = math.prod(lead)
    if n_heads < 1:
        return None
    ks_arr = np.asarray([int(k) for k in ks], dtype=np.int64)
    if ((ks_arr < 0) | (ks_arr > m)).any():
        bad = int(ks_arr[(ks_arr < 0) | (ks_arr > m)][0])
        raise ValueError(f"k (entries to drop) must lie in [0, {m}], got {bad}")
    bl = tuple(base.shape[:-2])
    n_base = math.prod(bl)
    base_idx = torch.arange(n_base).reshape(bl).expand(lead).reshape(-1).contiguous()
    if affine:
        lnw2 = ln_weight.detach().expand(lead + (1, m)).reshape(n_heads, m).contiguous()
        lnb2 = ln_bias.detach().expand(lead + (1, m)).reshape(n_heads, m).contiguous()
    else:
        lnw2 = lnb2 = torch.zeros((n_heads, m))  # unused placeholders
    return Plan(
        lead=lead,
        n_rows=int(n_rows),
        base3=base.detach().reshape(n_base, n_rows, m).contiguous(),
        base_idx=base_idx,
        affine=affine,
        lnw2=lnw2,
        lnb2=lnb2,
        weight3=weight.detach().expand(lead + (n_cls, m)).reshape(n_heads, n_cls, m).contiguous(),
        bias2=bias.detach().expand(lead + (n_cls,)).reshape(n_heads, n_cls).contiguous(),
        ks=np.repeat(ks_arr, n_heads // lead[0]),
    )


def _threads() -> int:
    return max(1, min(int(torch.get_num_threads()), int(numba.config.NUMBA_NUM_THREADS)))


def _set_threads() -> int:
    """Give numba the thread count torch uses (call holding ``_LOCK``); returns it."""
    threads = _threads()
    numba.set_num_threads(threads)
    return threads


@functools.lru_cache(maxsize=64)
def _order(n_heads: int, threads: int) -> np.ndarray:
    """The order in which ``prange`` visits the heads: numba splits the range into one
    contiguous chunk per thread, and neighbouring heads cost about the same (they share a
    sparsity; high sparsities take the cheaper sparse path), so head ``h`` goes to the chunk
    ``h mod threads``. Every head is computed start to end by one thread, so the order does
    not change any result; it balanced the backward pass (2.76 -> 2.22 ms for 24 heads on 2
    threads)."""
    return np.asarray([h for r in range(threads) for h in range(r, n_heads, threads)], dtype=np.int64)


def _n_sparse(m: int, n_cls: int) -> int:
    """Heads keeping at most this many of ``m`` entries use the sparse path (none if K > 16)."""
    return int(SPARSE_FRAC * m) if n_cls <= KP else 0


def forward(p: Plan, save_state: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Logits ``lead + (B, K)`` and, if ``save_state``, what :func:`backward` needs to
    rebuild the masks: per row (threshold bits, tie code) ``(H, B, 2)`` int32 for dense-path
    heads, the kept indices ``(H, B, n)`` int32 for sparse-path heads."""
    n_heads, n_cls, m = p.weight3.shape
    n_sparse = _n_sparse(m, n_cls)
    width = max([m - k for k in p.ks.tolist() if 0 < k < m and m - k <= n_sparse] or [0])
    logits = torch.empty((n_heads, p.n_rows, n_cls), dtype=torch.float32)
    lead = (n_heads, p.n_rows) if save_state else (0, 0)
    state = torch.empty(lead + (2,), dtype=torch.int32)
    idx = torch.empty(lead + (width,), dtype=torch.int32)
    with _LOCK:
        forward_kernel(
            *_inputs(p),
            p.bias2.numpy(),
            p.ks,
            n_sparse,
            _order(n_heads, _set_threads()),
            logits.numpy(),
            state.numpy(),
            idx.numpy(),
        )
    return logits.view(p.lead + (p.n_rows, n_cls)), ((state, idx) if save_state else None)


def _inputs(p: Plan) -> tuple:
    """The kernels' leading arguments: base, base index, LayerNorm weight and bias, affine flag, weight."""
    return (p.base3.numpy(), p.base_idx.numpy(), p.lnw2.numpy(), p.lnb2.numpy(), p.affine, p.weight3.numpy())


def backward(
    p: Plan,
    state: torch.Tensor,
    idx: torch.Tensor,
    grad: torch.Tensor,
    needs: tuple[bool, bool, bool, bool, bool],
    shapes: tuple[torch.Size, torch.Size | None, torch.Size | None, torch.Size, torch.Size],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (base, ln_weight, ln_bias, weight, bias), ``None`` where not needed;
    ``shapes`` are the input shapes (``sum_to_size`` targets)."""
    need_base, need_lnw, need_lnb, need_w, need_b = needs
    n_heads, n_cls, m = p.weight3.shape
    g = grad.detach().to(torch.float32).expand(p.lead + (p.n_rows, n_cls))
    g = g.reshape(n_heads, p.n_rows, n_cls).contiguous()

    def buf(shape, needed):
        return torch.empty(shape if needed else (1,) * len(shape), dtype=torch.float32)

    g_w = buf((n_heads, n_cls, m), need_w)
    g_b = buf((n_heads, n_cls), need_b)
    g_lnw = buf((n_heads, m), need_lnw)
    g_lnb = buf((n_heads, m), need_lnb)
    g_base = buf((n_heads, p.n_rows, m), need_base)
    with _LOCK:
        backward_kernel(
            *_inputs(p),
            p.ks,
            _n_sparse(m, n_cls),
            _order(n_heads, _set_threads()),
            state.numpy(),
            idx.numpy(),
            g.numpy(),
            need_w,
            need_b,
            need_lnw,
            need_lnb,
            need_base,
            g_w.numpy(),
            g_b.numpy(),
            g_lnw.numpy(),
            g_lnb.numpy(),
            g_base.numpy(),
        )
    s_base, s_lnw, s_lnb, s_w, s_b = shapes
    lead = p.lead
    out_base = g_base.view(lead + (p.n_rows, m)).sum_to_size(s_base) if need_base else None
    out_lnw = g_lnw.view(lead + (1, m)).sum_to_size(s_lnw) if need_lnw else None
    out_lnb = g_lnb.view(lead + (1, m)).sum_to_size(s_lnb) if need_lnb else None
    out_w = g_w.view(lead + (n_cls, m)).sum_to_size(s_w) if need_w else None
    out_b = g_b.view(lead + (n_cls,)).sum_to_size(s_b) if need_b else None
    return out_base, out_lnw, out_lnb, out_w, out_b


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``scale * sum of cross-entropies`` over the rows of ``logits`` (..., K) with class indices
    ``target`` (..., 1), and its gradient ``scale * (softmax - onehot)`` (subnormals zeroed), in
    one parallel pass; ``None`` when the kernel does not apply (disabled, not CPU float32)."""
    if not enabled() or logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    n_cls = logits.shape[-1]
    flat = logits.detach().reshape(-1, n_cls).contiguous()
    tgt = target.reshape(-1).to(torch.int64).contiguous()
    if tgt.shape[0] != flat.shape[0]:
        return None
    grad = torch.empty_like(flat)
    loss_rows = torch.empty(flat.shape[0], dtype=torch.float32)
    with _LOCK:
        _set_threads()
        cross_entropy_kernel(flat.numpy(), tgt.numpy(), np.float32(scale), grad.numpy(), loss_rows.numpy())
    return loss_rows.sum() * scale, grad.view(logits.shape)
