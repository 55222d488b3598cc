"""Fused numba CPU kernel for the batched interpretation heads (METHOD §3).

``heads._InterpHeads`` computes, for every head ``h`` and sample row ``b``::

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
by index, so exactly ``M - k`` entries are kept, as in ``heads._keep_mask``.

Heads that keep few entries (at most ``_SPARSE_FRAC * M``, with K <= 16) take a sparse
path: the kept indices are compacted (AVX-512 ``vpcompressd``) and the logits and
gradients touch only those, with the weight transposed and padded to 16 classes.

Parallelism: ``prange`` over heads (each head's gradients are accumulated by one thread,
so there are no races and the result does not depend on the thread count); the number
of threads follows ``torch.get_num_threads()``. Gradient sums over the rows are
accumulated in float32 blocks of ``_BLOCK`` rows and the blocks in float64.

The kernel is used by :class:`iis_study.core.heads._InterpHeads` on CPU float32
tensors when numba imports; ``IIS_FUSED=0`` in the environment disables it. Rows with
NaN activations give unspecified (but memory-safe) results, as in the torch path.
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
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

_BLOCK = 32  # rows per float32 partial sum before adding into the float64 totals
_BLOCK_SPARSE = 128  # the same for sparse-path heads (few entries per row, a larger block)
_INF_BITS = 0x7F800000  # bit pattern of +inf
_STEP0 = 1 << 20  # first bracketing step in bit-pattern units (~ 1/8 of a binade)
_SPARSE_FRAC = 0.15  # heads keeping <= this fraction of the M entries use the sparse path
_KP = 16  # the sparse path pads the classes to 16 lanes (used when K <= 16)
# 'reassoc' lets LLVM vectorise the dot products and row sums; no nnan/ninf, so NaNs
# propagate as in torch. The selection works on integers and is unaffected.
_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}
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

    @intrinsic
    def _fma(typingctx, x, y, z):
        """``x * y + z`` with one rounding (as torch.addcmul on CPU)."""
        if not (x == types.float32 and y == types.float32 and z == types.float32):
            return None
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            f32 = _llvm_ir.FloatType()
            fnty = _llvm_ir.FunctionType(f32, [f32, f32, f32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
            return builder.call(fn, args)

        return sig, codegen

    @intrinsic
    def _bits_to_f32(typingctx, x):
        """The float32 whose bit pattern is the int32 ``x``."""
        if x != types.int32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())

        return types.float32(types.int32), codegen

    @njit(cache=True, fastmath=_FASTMATH)
    def _count_le(v, m, g):
        """``#(v <= g)``, summed as float32 (exact below 2^24; vectorises)."""
        c = np.float32(0.0)
        for i in range(m):
            c += np.float32(1.0) if v[i] <= g else np.float32(0.0)
        return np.int64(c)

    @njit(cache=True)
    def _max_le(vi, m, g):
        """Largest ``vi[i] <= g`` (or -1) on int32 bit patterns (integer max vectorises)."""
        r = np.int32(-1)
        for i in range(m):
            x = vi[i]
            t = x if x <= g else np.int32(-1)
            r = max(r, t)
        return r

    @njit(cache=True, fastmath=_FASTMATH)
    def _keep_from_thr(v, kf, m, k, thr):
        """Keep-mask given the ``(k+1)``-th smallest value ``thr``: ``v > thr``, plus the
        lowest-indexed entries equal to ``thr`` up to ``M - k`` kept in all.

        Returns the tie code: -1 when all entries ``>= thr`` are kept, else the number
        of entries equal to ``thr`` that are kept (see :func:`_sparse_row`).
        """
        n_ge = np.float32(0.0)
        for i in range(m):
            ge = v[i] >= thr
            kf[i] = np.float32(1.0) if ge else np.float32(0.0)
            n_ge += np.float32(1.0) if ge else np.float32(0.0)
        if np.int64(n_ge) == m - k:
            return np.int32(-1)
        n_gt = 0
        for i in range(m):
            n_gt += np.int64(v[i] > thr)
        need = (m - k) - n_gt
        _apply_ties(v, kf, m, thr, need)
        return np.int32(need)

    @njit(cache=True)
    def _apply_ties(v, kf, m, thr, need):
        """``kf = v > thr``, plus the first ``need`` entries equal to ``thr`` (index order)."""
        seen = 0
        for i in range(m):
            eq = v[i] == thr
            keep = v[i] > thr or (eq and seen < need)
            seen += np.int64(eq)
            kf[i] = np.float32(1.0) if keep else np.float32(0.0)

    @njit(cache=True, fastmath=_FASTMATH)
    def _row_keep(v, vi, kf, m, k, guess):
        """Fill ``kf`` with the keep-mask (0/1) of the row ``v = |a|`` (``0 < k < m``;
        ``vi`` is ``v`` viewed as int32).

        Probes ``c(g) = #(v <= g)`` at values ``g`` given by their float bit patterns
        (integers, monotone in ``g`` for ``g >= 0``), keeping a bracket ``lo < g* <= hi``
        with ``c(lo) < k + 1 <= c(hi)``. Starts at ``guess`` (the previous row's result),
        steps outwards geometrically until bracketed, then interpolates on the counts
        (bisecting when a probe did not halve the bracket). Stops when ``c(g) == k``
        (keep ``v > g``: exactly ``M - k`` entries), or ``c(g) == k + 1`` or the bracket
        is one bit pattern wide (then the ``(k+1)``-th smallest value is known and ties
        are broken by index).

        Returns ``(next guess, threshold bits, tie code)``, from which
        :func:`_sparse_row` rebuilds the mask.
        """
        target = k + 1
        lo = np.int64(-1)
        c_lo = 0
        hi = np.int64(_INF_BITS)
        c_hi = m
        have_lo = False
        have_hi = False
        step = np.int64(_STEP0)
        g = np.int64(guess)
        bisect = False
        while True:
            if g <= lo or g >= hi:
                g = lo + (hi - lo) // 2
            gf = _bits_to_f32(np.int32(g))
            c = _count_le(v, m, gf)
            width = hi - lo
            if c == k:
                for i in range(m):
                    kf[i] = np.float32(1.0) if v[i] > gf else np.float32(0.0)
                return np.int32(g), np.int32(g), np.int32(0)
            if c == target:
                thr = _max_le(vi, m, np.int32(g))
                return np.int32(g), thr, _keep_from_thr(v, kf, m, k, _bits_to_f32(thr))
            if c > target:
                hi = g
                c_hi = c
                have_hi = True
            else:
                lo = g
                c_lo = c
                have_lo = True
            if hi - lo <= 1:
                thr = np.int32(hi)
                return thr, thr, _keep_from_thr(v, kf, m, k, _bits_to_f32(thr))
            if not have_hi:
                g = lo + step
                step *= 2
            elif not have_lo:
                g = hi - step
                step *= 2
            elif bisect:
                g = lo + (hi - lo) // 2
                bisect = False
            else:
                # aim at count k + 1/2 on the line through (lo, c_lo) and (hi, c_hi)
                g = lo + ((hi - lo) * (2 * k + 1 - 2 * c_lo)) // (2 * (c_hi - c_lo))
                bisect = 2 * (hi - lo) > width  # this probe did not halve the bracket

    @njit(cache=True, fastmath=_FASTMATH)
    def _dense_logits(sp, w, bias_h, out, m, n_cls):
        """``out = w @ sp + bias_h`` (two classes per pass over ``sp``)."""
        j = 0
        while j + 1 < n_cls:
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            for i in range(m):
                acc0 += sp[i] * w[j, i]
                acc1 += sp[i] * w[j + 1, i]
            out[j] = acc0 + bias_h[j]
            out[j + 1] = acc1 + bias_h[j + 1]
            j += 2
        if j < n_cls:
            acc0 = np.float32(0.0)
            for i in range(m):
                acc0 += sp[i] * w[j, i]
            out[j] = acc0 + bias_h[j]

    @njit(cache=True, fastmath=_FASTMATH)
    def _activations(x, lnw_h, lnb_h, affine, a, v, m):
        """``a = lnb + x * lnw`` (one rounding, as torch.addcmul) or ``a = x``; ``v = |a|``."""
        if affine:
            for i in range(m):
                t = _fma(x[i], lnw_h[i], lnb_h[i])
                a[i] = t
                v[i] = abs(t)
        else:
            for i in range(m):
                a[i] = x[i]
                v[i] = abs(x[i])

    @intrinsic
    def _compress16(typingctx, v, start, out, n):
        """Append to ``out[n:]`` the indices ``start + t`` (``t < 16``) with ``v[start + t] > 0.5``
        (one AVX-512 ``vpcompressd``); returns the new ``n``."""
        sig = types.int64(v, types.int64, out, types.int64)

        def codegen(context, builder, signature, args):
            v_ty, _, out_ty, _ = signature.args
            v_arr = context.make_array(v_ty)(context, builder, args[0])
            out_arr = context.make_array(out_ty)(context, builder, args[2])
            f32, i32, i64 = _llvm_ir.FloatType(), _llvm_ir.IntType(32), _llvm_ir.IntType(64)
            vf = _llvm_ir.VectorType(f32, 16)
            vi = _llvm_ir.VectorType(i32, 16)
            vb = _llvm_ir.VectorType(_llvm_ir.IntType(1), 16)
            vec = builder.load(builder.gep(v_arr.data, [args[1]]), typ=vf, align=4)
            mask = builder.fcmp_ordered(">", vec, _llvm_ir.Constant(vf, [0.5] * 16))
            first = builder.insert_element(
                _llvm_ir.Constant(vi, _llvm_ir.Undefined),
                builder.trunc(args[1], i32),
                _llvm_ir.Constant(i32, 0),
            )
            splat = builder.shuffle_vector(
                first, _llvm_ir.Constant(vi, _llvm_ir.Undefined), _llvm_ir.Constant(vi, [0] * 16)
            )
            iota = builder.add(splat, _llvm_ir.Constant(vi, list(range(16))))
            dst = builder.gep(out_arr.data, [args[3]])
            fnty = _llvm_ir.FunctionType(_llvm_ir.VoidType(), [vi, dst.type, vb])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.compressstore.v16i32")
            builder.call(fn, [iota, dst, mask])
            i16 = _llvm_ir.IntType(16)
            pop = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(i16, [i16]), "llvm.ctpop.i16"
            )
            cnt = builder.zext(builder.call(pop, [builder.bitcast(mask, i16)]), i64)
            return builder.add(args[3], cnt)

        return sig, codegen

    def _vec16_ptr(context, builder, aryty, ary, offset):
        """Pointer to the 16 float32 at flat element ``offset`` of a C-contiguous array."""
        arr = context.make_array(aryty)(context, builder, ary)
        v16 = _llvm_ir.VectorType(_llvm_ir.FloatType(), 16)
        return builder.bitcast(builder.gep(arr.data, [offset]), v16.as_pointer())

    @intrinsic
    def _axpy16(typingctx, y, y_off, x, x_off, alpha):
        """``y[y_off:y_off+16] += alpha * x[x_off:x_off+16]`` (flat offsets, one vector FMA)."""
        sig = types.void(y, types.int64, x, types.int64, types.float32)

        def codegen(context, builder, signature, args):
            v16 = _llvm_ir.VectorType(_llvm_ir.FloatType(), 16)
            yp = _vec16_ptr(context, builder, signature.args[0], args[0], args[1])
            xp = _vec16_ptr(context, builder, signature.args[2], args[2], args[3])
            i32 = _llvm_ir.IntType(32)
            a = builder.insert_element(
                _llvm_ir.Constant(v16, _llvm_ir.Undefined), args[4], _llvm_ir.Constant(i32, 0)
            )
            splat = _llvm_ir.Constant(_llvm_ir.VectorType(i32, 16), [0] * 16)
            a = builder.shuffle_vector(a, _llvm_ir.Constant(v16, _llvm_ir.Undefined), splat)
            fn = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
            )
            builder.store(
                builder.call(fn, [builder.load(xp, align=4), a, builder.load(yp, align=4)]), yp, align=4
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _dot16(typingctx, x, x_off, y, y_off):
        """``sum(x[x_off:x_off+16] * y[y_off:y_off+16])`` (flat offsets, one vector product)."""
        sig = types.float32(x, types.int64, y, types.int64)

        def codegen(context, builder, signature, args):
            f32 = _llvm_ir.FloatType()
            v16 = _llvm_ir.VectorType(f32, 16)
            xp = _vec16_ptr(context, builder, signature.args[0], args[0], args[1])
            yp = _vec16_ptr(context, builder, signature.args[2], args[2], args[3])
            prod = builder.fmul(builder.load(xp, align=4), builder.load(yp, align=4))
            fn = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(f32, [f32, v16]), "llvm.vector.reduce.fadd.v16f32"
            )
            return builder.call(fn, [_llvm_ir.Constant(f32, 0.0), prod], fastmath=("reassoc", "nsz"))

        return sig, codegen

    @njit(cache=True)
    def _compact(kf, m, ix):
        """Indices of the kept entries (``kf > 0.5``) into ``ix``, in increasing order; returns their number."""
        n = np.int64(0)
        i = np.int64(0)
        while i + 16 <= m:
            n = _compress16(kf, i, ix, n)
            i += 16
        while i < m:
            if kf[i] > 0.5:
                ix[n] = i
                n += 1
            i += 1
        return n

    @njit(cache=True)
    def _transpose_pad(w, wt):
        """``wt[:, :K] = w.T``, zero in the padding columns."""
        n_cls, m = w.shape
        wt[:, :] = 0.0
        for j in range(n_cls):
            for i in range(m):
                wt[i, j] = w[j, i]

    @njit(cache=True, fastmath=_FASTMATH)
    def _sparse_logits(a, ix, n, wt, bias_h, acc, out):
        """``out = sum over kept i of a[i] * wt[i, :K] + bias_h``; ``wt`` is (M, 16) and
        ``acc`` a (4, 16) scratch (four partial sums break the dependency chain)."""
        acc[:, :] = 0.0
        t = 0
        while t + 3 < n:
            _axpy16(acc, 0, wt, np.int64(ix[t]) * _KP, a[ix[t]])
            _axpy16(acc, _KP, wt, np.int64(ix[t + 1]) * _KP, a[ix[t + 1]])
            _axpy16(acc, 2 * _KP, wt, np.int64(ix[t + 2]) * _KP, a[ix[t + 2]])
            _axpy16(acc, 3 * _KP, wt, np.int64(ix[t + 3]) * _KP, a[ix[t + 3]])
            t += 4
        while t < n:
            _axpy16(acc, 0, wt, np.int64(ix[t]) * _KP, a[ix[t]])
            t += 1
        for j in range(out.shape[0]):
            out[j] = (acc[0, j] + acc[1, j]) + (acc[2, j] + acc[3, j]) + bias_h[j]

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def _forward_kernel(base, base_idx, lnw, lnb, affine, weight, bias, ks, n_sparse, order, logits, state, idx):
        """Logits (H, B, K) of every head.

        Heads keeping at most ``n_sparse`` entries (``0 < k < M``) use the sparse path:
        the kept indices of each row go to ``idx[h, b, :M-k]`` and the logits are summed
        over them; other heads keep a dense row. For the backward pass, ``state`` (H, B, 2)
        int32 receives the threshold bits and tie code of each dense-path row with
        ``0 < k < M`` (sparse path: the number of kept indices in ``state[h, b, 0]``).
        ``state``/``idx`` with a leading size 0: nothing is saved.
        """
        n_heads, n_cls, m = weight.shape
        n_rows = base.shape[1]
        save = state.shape[0] > 0
        kp = _KP
        for oi in prange(n_heads):
            h = order[oi]
            a = np.empty(m, np.float32)
            v = np.empty(m, np.float32)
            vi = v.view(np.int32)
            kf = np.empty(m, np.float32)
            sp = np.empty(m, np.float32)
            ix_buf = np.empty(m, np.int32)
            acc = np.empty((4, kp), np.float32)
            k = ks[h]
            sparse = 0 < k < m and m - k <= n_sparse
            wt = np.empty((m if sparse else 0, kp), np.float32)
            if sparse:
                _transpose_pad(weight[h], wt)
            x_all = base[base_idx[h]]
            w = weight[h]
            lnw_h = lnw[h]
            lnb_h = lnb[h]
            guess = np.int32(0x3F000000)  # 0.5
            kf[:] = 1.0 if k == 0 else 0.0
            for b in range(n_rows):
                _activations(x_all[b], lnw_h, lnb_h, affine, a, v, m)
                if 0 < k < m:
                    guess, thr, tie = _row_keep(v, vi, kf, m, k, guess)
                    if save and not sparse:
                        state[h, b, 0] = thr
                        state[h, b, 1] = tie
                if sparse:
                    ix = idx[h, b] if save else ix_buf
                    n = _compact(kf, m, ix)  # M - k (fewer only if the row has NaNs)
                    if save:
                        state[h, b, 0] = n
                    _sparse_logits(a, ix, n, wt, bias[h], acc, logits[h, b])
                else:
                    for i in range(m):
                        sp[i] = a[i] * kf[i]
                    _dense_logits(sp, w, bias[h], logits[h, b], m, n_cls)

    @njit(cache=True, fastmath=_FASTMATH)
    def _sparse_row(x, lnw_h, lnb_h, affine, kf, sp, m, thr_bits, tie):
        """Rebuild a dense-path row's keep-mask ``kf`` and ``sp = a * kf`` from its saved state."""
        thr = _bits_to_f32(thr_bits)
        if affine:
            if tie < 0:
                for i in range(m):
                    t = _fma(x[i], lnw_h[i], lnb_h[i])
                    kf[i] = np.float32(1.0) if abs(t) >= thr else np.float32(0.0)
                    sp[i] = t * kf[i]
            else:
                for i in range(m):
                    t = _fma(x[i], lnw_h[i], lnb_h[i])
                    kf[i] = np.float32(1.0) if abs(t) > thr else np.float32(0.0)
                    sp[i] = t * kf[i]
        else:
            if tie < 0:
                for i in range(m):
                    kf[i] = np.float32(1.0) if abs(x[i]) >= thr else np.float32(0.0)
                    sp[i] = x[i] * kf[i]
            else:
                for i in range(m):
                    kf[i] = np.float32(1.0) if abs(x[i]) > thr else np.float32(0.0)
                    sp[i] = x[i] * kf[i]
        if tie > 0:  # rare: ties straddle the threshold
            if affine:
                for i in range(m):
                    sp[i] = abs(_fma(x[i], lnw_h[i], lnb_h[i]))
            else:
                for i in range(m):
                    sp[i] = abs(x[i])
            _apply_ties(sp, kf, m, thr, tie)
            if affine:
                for i in range(m):
                    sp[i] = _fma(x[i], lnw_h[i], lnb_h[i]) * kf[i]
            else:
                for i in range(m):
                    sp[i] = x[i] * kf[i]

    @njit(cache=True, fastmath=_FASTMATH)
    def _grad_act(gr, w, gs, m, n_cls):
        """``gs = gr @ w`` (d loss / d sparse activations; four classes per pass)."""
        for i in range(m):
            gs[i] = 0.0
        j = 0
        while j + 3 < n_cls:
            g0 = gr[j]
            g1 = gr[j + 1]
            g2 = gr[j + 2]
            g3 = gr[j + 3]
            for i in range(m):
                gs[i] += g0 * w[j, i] + g1 * w[j + 1, i] + g2 * w[j + 2, i] + g3 * w[j + 3, i]
            j += 4
        while j < n_cls:
            g0 = gr[j]
            for i in range(m):
                gs[i] += g0 * w[j, i]
            j += 1

    @njit(cache=True, fastmath=_FASTMATH)
    def _sparse_backward_row(
        x, lnw_h, lnb_h, affine, ix, n, g16, wt, blk_wt, blk_lnw, blk_lnb, gb_row,
        need_w, need_a, need_lnw, need_lnb, need_base,
    ):  # fmt: skip
        """One sparse-path row of the backward pass: only the kept entries ``ix[:n]`` get
        gradients (``blk_wt`` is the transposed, padded weight gradient)."""
        for t in range(n):
            i = ix[t]
            xi = x[i]
            if affine:
                ai = _fma(xi, lnw_h[i], lnb_h[i])
            else:
                ai = xi
            if need_w:
                _axpy16(blk_wt, np.int64(i) * _KP, g16, 0, ai)
            if need_a:
                s = _dot16(g16, 0, wt, np.int64(i) * _KP)
                if need_lnb:
                    blk_lnb[i] += s
                if need_lnw:
                    blk_lnw[i] += s * xi
                if need_base:
                    gb_row[i] = s * lnw_h[i] if affine else s

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def _backward_kernel(
        base, base_idx, lnw, lnb, affine, weight, ks, n_sparse, order, state, idx, grad,
        need_w, need_b, need_lnw, need_lnb, need_base,
        g_w, g_b, g_lnw, g_lnb, g_base,
    ):  # fmt: skip
        n_heads, n_cls, m = weight.shape
        n_rows = grad.shape[1]
        need_a = need_lnw or need_lnb or need_base
        kp = _KP
        for oi in prange(n_heads):
            h = order[oi]
            k = ks[h]
            sparse = 0 < k < m and m - k <= n_sparse
            sp = np.empty(m, np.float32)
            kf = np.empty(m, np.float32)
            gs = np.empty(m, np.float32)
            g16 = np.zeros(kp, np.float32)
            wt = np.empty((m if sparse else 0, kp), np.float32)
            if sparse:
                _transpose_pad(weight[h], wt)
            rows_w = m if sparse else n_cls  # sparse path: transposed, padded (M, Kp)
            cols_w = kp if sparse else m
            blk_w = np.zeros((rows_w, cols_w), np.float32)
            tot_w = np.zeros((rows_w, cols_w), np.float64)
            blk_b = np.zeros(n_cls, np.float32)
            blk_lnw = np.zeros(m, np.float32)
            blk_lnb = np.zeros(m, np.float32)
            tot_b = np.zeros(n_cls, np.float64)
            tot_lnw = np.zeros(m, np.float64)
            tot_lnb = np.zeros(m, np.float64)
            x_all = base[base_idx[h]]
            w = weight[h]
            lnw_h = lnw[h]
            lnb_h = lnb[h]
            kf[:] = 1.0 if k == 0 else 0.0
            for b in range(n_rows):
                x = x_all[b]
                gr = grad[h, b]
                if need_b:
                    for j in range(n_cls):
                        blk_b[j] += gr[j]
                if k >= m:  # nothing kept: no gradient into the activations or the weight
                    if need_base:
                        for i in range(m):
                            g_base[h, b, i] = 0.0
                elif sparse:
                    if need_w or need_a:
                        for j in range(n_cls):
                            g16[j] = gr[j]
                        if need_base:
                            for i in range(m):
                                g_base[h, b, i] = 0.0
                        _sparse_backward_row(
                            x, lnw_h, lnb_h, affine, idx[h, b], state[h, b, 0], g16, wt, blk_w, blk_lnw, blk_lnb,
                            g_base[h, b] if need_base else gs, need_w, need_a, need_lnw, need_lnb, need_base,
                        )  # fmt: skip
                else:
                    if need_w or need_a:
                        if k == 0:
                            if affine:
                                for i in range(m):
                                    sp[i] = _fma(x[i], lnw_h[i], lnb_h[i])
                            else:
                                for i in range(m):
                                    sp[i] = x[i]
                        else:
                            _sparse_row(x, lnw_h, lnb_h, affine, kf, sp, m, state[h, b, 0], state[h, b, 1])
                    if need_w:
                        for j in range(n_cls):
                            gj = gr[j]
                            for i in range(m):
                                blk_w[j, i] += gj * sp[i]
                    if need_a:
                        _grad_act(gr, w, gs, m, n_cls)
                        if need_lnb and need_lnw and not need_base:
                            for i in range(m):
                                t = gs[i] * kf[i]
                                blk_lnb[i] += t
                                blk_lnw[i] += t * x[i]
                        else:
                            for i in range(m):
                                gs[i] *= kf[i]
                            if need_lnb:
                                for i in range(m):
                                    blk_lnb[i] += gs[i]
                            if need_lnw:
                                for i in range(m):
                                    blk_lnw[i] += gs[i] * x[i]
                            if need_base:
                                if affine:
                                    for i in range(m):
                                        g_base[h, b, i] = gs[i] * lnw_h[i]
                                else:
                                    for i in range(m):
                                        g_base[h, b, i] = gs[i]
                if (b + 1) % (_BLOCK_SPARSE if sparse else _BLOCK) == 0:
                    _flush(blk_w, blk_b, blk_lnw, blk_lnb, tot_w, tot_b, tot_lnw, tot_lnb)
            _flush(blk_w, blk_b, blk_lnw, blk_lnb, tot_w, tot_b, tot_lnw, tot_lnb)
            if need_w:
                for j in range(n_cls):
                    for i in range(m):
                        g_w[h, j, i] = tot_w[i, j] if sparse else tot_w[j, i]
            if need_b:
                for j in range(n_cls):
                    g_b[h, j] = tot_b[j]
            if need_lnw:
                for i in range(m):
                    g_lnw[h, i] = tot_lnw[i]
            if need_lnb:
                for i in range(m):
                    g_lnb[h, i] = tot_lnb[i]

    @njit(cache=True)
    def _flush(blk_w, blk_b, blk_lnw, blk_lnb, tot_w, tot_b, tot_lnw, tot_lnb):
        """Add the float32 block sums into the float64 totals and zero them."""
        r, c = blk_w.shape
        for j in range(r):
            for i in range(c):
                tot_w[j, i] += blk_w[j, i]
                blk_w[j, i] = 0.0
        for j in range(blk_b.shape[0]):
            tot_b[j] += blk_b[j]
            blk_b[j] = 0.0
        for i in range(blk_lnw.shape[0]):
            tot_lnw[i] += blk_lnw[i]
            tot_lnb[i] += blk_lnb[i]
            blk_lnw[i] = 0.0
            blk_lnb[i] = 0.0


    @njit(cache=True, parallel=True)
    def _cross_entropy_kernel(logits, target, scale, grad, loss_rows):
        """Per row ``r`` of ``logits`` (R, K): ``loss_rows[r] = logsumexp - logit[target]`` and
        ``grad[r] = scale * (softmax - onehot)`` with subnormal entries set to zero."""
        n_rows, n_cls = logits.shape
        tiny = np.float32(1.1754944e-38)  # smallest normal float32
        for r in prange(n_rows):
            mx = logits[r, 0]
            for j in range(1, n_cls):
                mx = max(mx, logits[r, j])
            total = np.float32(0.0)
            for j in range(n_cls):
                e = np.exp(logits[r, j] - mx)
                grad[r, j] = e
                total += e
            t = target[r]
            loss_rows[r] = np.log(total) - (logits[r, t] - mx)
            for j in range(n_cls):
                gj = (grad[r, j] / total - (np.float32(1.0) if j == t else np.float32(0.0))) * scale
                grad[r, j] = gj if abs(gj) >= tiny else np.float32(0.0)


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
    """Flatten the inputs of ``_InterpHeads`` for the kernel, or ``None`` when it does not apply
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
    return int(_SPARSE_FRAC * m) if n_cls <= _KP else 0


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
        _forward_kernel(
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
        _backward_kernel(
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
        _cross_entropy_kernel(flat.numpy(), tgt.numpy(), np.float32(scale), grad.numpy(), loss_rows.numpy())
    return loss_rows.sum() * scale, grad.view(logits.shape)
