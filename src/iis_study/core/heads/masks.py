"""Sparsification (METHOD §3 step 2) and the custom autograd functions of the heads.

:func:`n_dropped` (``k = floor(s * M)``, exact), :func:`sparsify` and the keep-masks behind it
(exactly ``M - k`` entries of largest ``|a|`` per row, ties broken by index);
:class:`InterpHeads`, every interpretation head's ``[affine] -> sparsify -> linear`` in one
op (the fused numba kernel of :mod:`.fused` on CPU float32), and :class:`SumCrossEntropy`,
the summed cross-entropy of many heads at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import torch


def n_dropped(sparsity: float, m: int) -> int:
    """``k = floor(s * M)`` computed exactly on the decimal value of ``s``.

    ``floor(0.7 * 90)`` is 63 here, whereas the float product ``0.7 * 90`` is
    62.99999999999999 (on the default grid, 34 values of M up to 2,000 round the wrong way
    in float). The shortest decimal representation of the float is used
    (``Fraction(repr(float(s)))``), so grid values written in decimal are exact.
    """
    s = float(sparsity)
    if not math.isfinite(s) or s < 0.0 or s > 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if int(m) < 1:
        raise ValueError(f"m (number of concepts) must be >= 1, got {m}")
    return math.floor(Fraction(repr(s)) * int(m))


def flush_denormals(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with subnormal entries set to zero (a tensor hook for logits).

    Once a head is confident, the cross-entropy gradient ``softmax - onehot`` holds
    probabilities below the smallest normal float. Matrix products over subnormals run
    tens of times slower on x86 CPUs (measured: 48 ms instead of 1 ms for the probe's
    weight gradient), and ``torch.set_flush_denormal`` reaches only the calling thread,
    not the BLAS/OpenMP workers. Zeroing them changes each gradient by < 1.2e-38.
    """
    if not grad.is_floating_point():
        return grad
    tiny = torch.finfo(grad.dtype).tiny
    return grad.masked_fill(grad.abs() < tiny, 0.0)


def _check_k(k: int, m: int) -> None:
    if k < 0 or k > m:
        raise ValueError(f"k (entries to drop) must lie in [0, {m}], got {k}")


def _threshold_np(v: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    """Per-row smallest kept value of ``v`` (>= 0) when dropping ``k`` (0 < k < M), and
    whether ties straddle it (a dropped entry equal to the threshold)."""
    part = np.partition(v, k, axis=-1)
    thr = part[..., k : k + 1]
    ties = bool((part[..., :k].max(-1, keepdims=True) == thr).any())
    return np.ascontiguousarray(thr), ties


def _tie_break(v: torch.Tensor, thr: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask when ties straddle the threshold: lowest-indexed ties are kept first."""
    m = v.shape[-1]
    above = v > thr
    need = (m - k) - above.sum(-1, keepdim=True)
    tie = v == thr
    return above | (tie & (tie.cumsum(-1) <= need))


def keep_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``M - k`` entries of largest ``|a|`` per row (last axis).

    Exactly ``M - k`` entries per row are kept; ties are broken by index (among equal
    ``|a|`` the lower index is kept first). On CPU the threshold comes from
    ``numpy.partition`` (introselect, several times faster than ``torch.kthvalue``);
    elsewhere from ``torch.kthvalue``.
    """
    m = a.shape[-1]
    _check_k(k, m)
    if k == 0 or k == m:
        return torch.full(a.shape, k == 0, dtype=torch.bool, device=a.device)
    a = a.detach()
    if a.device.type == "cpu":
        v = np.abs(a.numpy())
        thr, ties = _threshold_np(v, k)
        if not ties:
            return torch.from_numpy(v >= thr)
        return _tie_break(torch.from_numpy(v), torch.from_numpy(thr), k)
    v_t = a.abs()
    thr_t = torch.kthvalue(v_t, k + 1, dim=-1, keepdim=True).values
    keep = v_t >= thr_t
    if bool((keep.sum(-1) == m - k).all()):
        return keep
    return _tie_break(v_t, thr_t, k)


def _grouped_keep(a: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Keep-mask as 0/1 floats (dtype of ``a``) for ``a`` (G, ..., M), one ``k`` per slice ``a[g]``.

    A float mask is returned because multiplying by it is several times faster on CPU
    than ``masked_fill`` or multiplying by a bool mask; on CPU it is filled with numpy.
    """
    if len(ks) != a.shape[0]:
        raise ValueError(f"need one k per leading slice: {a.shape[0]} slices, got {len(ks)} values of k")
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.device.type != "cpu" or not a.is_contiguous():
        for g, kg in enumerate(ks):
            out[g].copy_(keep_mask(a[g], int(kg)))
        return out
    a_np, out_np = a.detach().numpy(), out.numpy()
    m = a.shape[-1]
    for kg in ks:
        _check_k(int(kg), m)

    def fill(g: int) -> None:
        kg = int(ks[g])
        if kg == 0 or kg == m:
            out_np[g] = float(kg == 0)
            return
        v = np.abs(a_np[g])
        thr, ties = _threshold_np(v, kg)
        keep = _tie_break(torch.from_numpy(v), torch.from_numpy(thr), kg).numpy() if ties else v >= thr
        np.copyto(out_np[g], keep)

    workers = min(torch.get_num_threads(), len(ks))
    if workers <= 1:
        for g in range(len(ks)):
            fill(g)
    else:  # numpy releases the GIL in partition and ufuncs: groups run in parallel
        list(_thread_pool(workers).map(fill, range(len(ks))))
    return out


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A per-process thread pool with ``workers`` threads (created once per process, so
    a forked worker never reuses its parent's dead threads)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iis-mask")
    return _POOLS[key]


def sparsify(a: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """METHOD §3 step 2: per row keep the ``M - k`` entries of largest ``|a|``, zero the rest.

    Exactly ``M - k`` entries are kept per row (ties broken by index, lower first). The
    mask is computed on detached values; gradients flow only through the kept entries
    (unchanged there). ``k`` is an int, or an integer tensor whose shape is a *prefix*
    of ``a.shape[:-1]`` (left-aligned), e.g. one ``k`` per head for ``a`` of shape
    ``(H, B, M)``. Use :func:`n_dropped` for ``k = floor(s * M)``.
    """
    if a.ndim < 1:
        raise ValueError("a must have at least one dimension (the concept axis)")
    if isinstance(k, torch.Tensor) and k.ndim > 0:
        if k.ndim >= a.ndim or tuple(k.shape) != tuple(a.shape[: k.ndim]):
            raise ValueError(
                f"k must have a shape that prefixes a.shape[:-1]={tuple(a.shape[:-1])}, got {tuple(k.shape)}"
            )
        flat = a.reshape((k.numel(),) + tuple(a.shape[k.ndim :]))
        keep = _grouped_keep(flat.detach().contiguous(), [int(x) for x in k.reshape(-1).tolist()])
        return a * keep.reshape(a.shape)
    return a * keep_mask(a, int(k)).to(a.dtype)


class InterpHeads(torch.autograd.Function):
    """All interpretation heads in one op: ``[affine] -> sparsify -> linear`` (METHOD §3).

    Inputs broadcast to the activation shape (G, ..., B, M): ``base`` (normalised concept
    scores), ``ln_weight``/``ln_bias`` (per-head LayerNorm affine, or ``None`` for
    activations used as they are) and the linear head ``weight`` (G, ..., K, M) /
    ``bias`` (G, ..., K); ``ks`` holds one ``k`` per leading group. Fusing the steps
    lets the backward pass reuse its buffers in place and skip the gradient into the
    activations when nothing upstream needs it. The mask is constant (computed on
    detached values), so gradients flow through kept entries only.

    On CPU float32 tensors, when numba imports, forward and backward run the fused kernel
    of :mod:`.fused` (one pass per head and row, parallel over heads with torch's
    thread count); ``IIS_FUSED=0`` in the environment, CUDA tensors or other dtypes use the
    torch code below.
    """

    @staticmethod
    def forward(ctx, base, ln_weight, ln_bias, weight, bias, ks, track=True):  # type: ignore[override]
        plan = InterpHeads._fused_plan(base, ln_weight, ln_bias, weight, bias, ks)
        ctx.fused = plan is not None
        if plan is not None:
            from . import fused

            # ``track``: whether grad mode was on at the call (inside forward it is always off)
            logits, saved = fused.forward(plan, save_state=track and any(ctx.needs_input_grad[:5]))
            ctx.save_for_backward(base, ln_weight, ln_bias, weight, bias, *(saved or (None, None)))
            ctx.plan = plan if track else None  # flattened views of the saved inputs, reused by backward
            return logits
        if ln_weight is not None:
            sparse = torch.addcmul(ln_bias, base, ln_weight)
        else:
            shape = tuple(weight.shape[:-2]) + tuple(base.shape[-2:])
            # always a fresh copy: mul_ below must not touch the input
            sparse = base.expand(shape).clone(memory_format=torch.contiguous_format)
        keep = _grouped_keep(sparse, ks)
        sparse.mul_(keep)
        logits = torch.matmul(sparse, weight.transpose(-1, -2)).add_(bias.unsqueeze(-2))
        ctx.save_for_backward(base, ln_weight, sparse, keep, weight)
        ctx.ln_bias_shape = None if ln_bias is None else ln_bias.shape
        return logits

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.fused:
            return InterpHeads._fused_backward(ctx, grad)
        base, ln_weight, sparse, keep, weight = ctx.saved_tensors
        need_base, need_lnw, need_lnb, need_w, need_b = ctx.needs_input_grad[:5]
        g_base = g_lnw = g_lnb = g_w = g_b = None
        if need_b:
            g_b = grad.sum(-2)
        if need_w:
            g_w = torch.matmul(grad.transpose(-1, -2), sparse)
        if need_base or need_lnw or need_lnb:
            gs = torch.matmul(grad, weight).mul_(keep)  # d loss / d activations
            if need_lnb:
                g_lnb = gs.sum_to_size(ctx.ln_bias_shape)
            if need_base:
                g_base = (gs if ln_weight is None else gs * ln_weight).sum_to_size(base.shape)
            if need_lnw:
                # in place unless an earlier gradient is a view of gs (sum_to_size returns
                # its input unchanged when nothing is reduced, e.g. a minibatch of one)
                aliased = any(t is not None and t.data_ptr() == gs.data_ptr() for t in (g_lnb, g_base))
                g_lnw = (gs * base if aliased else gs.mul_(base)).sum_to_size(ln_weight.shape)
        return g_base, g_lnw, g_lnb, g_w, g_b, None, None

    @staticmethod
    def _fused_plan(base, ln_weight, ln_bias, weight, bias, ks):
        """Flattened inputs for the fused numba kernel (:mod:`.fused`), or ``None`` to
        use the torch code above: on CUDA, for non-float32 tensors, without numba, or
        with ``IIS_FUSED=0`` (:func:`.fused.plan` decides)."""
        from . import fused

        return fused.plan(base, ln_weight, ln_bias, weight, bias, ks)

    @staticmethod
    def _fused_backward(ctx, grad):
        from . import fused

        # reading saved_tensors also checks that no input was modified in place since forward
        base, ln_weight, ln_bias, weight, bias, state, idx = ctx.saved_tensors
        plan = ctx.plan
        shapes = (
            base.shape,
            None if ln_weight is None else ln_weight.shape,
            None if ln_bias is None else ln_bias.shape,
            weight.shape,
            bias.shape,
        )
        grads = fused.backward(plan, state, idx, grad, tuple(ctx.needs_input_grad[:5]), shapes)
        return (*grads, None, None)


def apply_heads(
    base: torch.Tensor, params: dict[str, torch.Tensor], prefix: str, affine: bool, ks: Sequence[int]
) -> torch.Tensor:
    """:class:`InterpHeads` on ``base`` with the parameters ``<prefix>weight``, ``<prefix>bias`` and,
    with an affine, ``<prefix>ln_weight`` / ``<prefix>ln_bias``."""
    return InterpHeads.apply(
        base,
        params[prefix + "ln_weight"].unsqueeze(-2) if affine else None,
        params[prefix + "ln_bias"].unsqueeze(-2) if affine else None,
        params[prefix + "weight"],
        params[prefix + "bias"],
        tuple(ks),
        torch.is_grad_enabled(),
    )


class SumCrossEntropy(torch.autograd.Function):
    """``scale * sum(cross_entropy(logits, target))`` over all leading axes, for many heads at once.

    The same value and gradient (``scale * (softmax - onehot)``) as
    ``scale * F.cross_entropy(..., reduction="sum")`` up to float rounding. ``log_softmax`` over a
    (heads x batch, 10) matrix is slow on CPU (2.7 ms for 24 heads x 1024 samples); on CPU float32
    the fused kernel (:func:`.fused.cross_entropy`) does value and gradient in one parallel
    pass (0.5 ms), elsewhere a handful of element-wise torch passes (1.0 ms). The gradient is
    computed in the forward pass with ``scale`` applied (a minibatch mean: ``scale = 1/B``) and
    its subnormal entries zeroed, as :func:`flush_denormals` does for the reference loop; the
    backward pass returns it as it is when the incoming gradient is 1 (``loss.backward()``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        from . import fused

        kernel_out = fused.cross_entropy(logits, target, scale)
        if kernel_out is not None:
            loss, grad = kernel_out
        else:
            z = logits - logits.amax(-1, keepdim=True)
            e = z.exp()
            total = e.sum(-1, keepdim=True)
            loss = (total.log() - z.gather(-1, target)).sum() * scale
            grad = e.div_(total)
            grad.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=grad.dtype, device=grad.device))
            grad = flush_denormals(grad.mul_(scale))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if g.device.type == "cpu" and g.numel() == 1 and g.item() == 1.0:
            return grad, None, None
        return flush_denormals(grad * g), None, None
