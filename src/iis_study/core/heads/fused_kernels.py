"""The numba kernels of the fused interpretation heads (see :mod:`.fused`): the per-row
selection of the kept entries, the forward and backward kernels and the fused
cross-entropy. All of them are in this one file because numba's cache (``cache=True``)
checks only the file of the cached function; the intrinsics they compile in are in
:mod:`.fused_intrinsics`.
"""

from __future__ import annotations

import numpy as np

try:  # numba is optional: without it the torch path is used
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

_BLOCK = 32  # rows per float32 partial sum before adding into the float64 totals
_BLOCK_SPARSE = 128  # the same for sparse-path heads (few entries per row, a larger block)
_INF_BITS = 0x7F800000  # bit pattern of +inf
_STEP0 = 1 << 20  # first bracketing step in bit-pattern units (~ 1/8 of a binade)
SPARSE_FRAC = 0.15  # heads keeping <= this fraction of the M entries use the sparse path
KP = 16  # the sparse path pads the classes to 16 lanes (used when K <= 16)
# 'reassoc' lets LLVM vectorise the dot products and row sums; no nnan/ninf, so NaNs
# propagate as in torch. The selection works on integers and is unaffected.
_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}


if numba is not None:
    from .fused_intrinsics import axpy16, bits_to_f32, compress16, dot16, fma

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
            gf = bits_to_f32(np.int32(g))
            c = _count_le(v, m, gf)
            width = hi - lo
            if c == k:
                for i in range(m):
                    kf[i] = np.float32(1.0) if v[i] > gf else np.float32(0.0)
                return np.int32(g), np.int32(g), np.int32(0)
            if c == target:
                thr = _max_le(vi, m, np.int32(g))
                return np.int32(g), thr, _keep_from_thr(v, kf, m, k, bits_to_f32(thr))
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
                return thr, thr, _keep_from_thr(v, kf, m, k, bits_to_f32(thr))
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
                t = fma(x[i], lnw_h[i], lnb_h[i])
                a[i] = t
                v[i] = abs(t)
        else:
            for i in range(m):
                a[i] = x[i]
                v[i] = abs(x[i])


    @njit(cache=True)
    def _compact(kf, m, ix):
        """Indices of the kept entries (``kf > 0.5``) into ``ix``, in increasing order; returns their number."""
        n = np.int64(0)
        i = np.int64(0)
        while i + 16 <= m:
            n = compress16(kf, i, ix, n)
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
            axpy16(acc, 0, wt, np.int64(ix[t]) * KP, a[ix[t]])
            axpy16(acc, KP, wt, np.int64(ix[t + 1]) * KP, a[ix[t + 1]])
            axpy16(acc, 2 * KP, wt, np.int64(ix[t + 2]) * KP, a[ix[t + 2]])
            axpy16(acc, 3 * KP, wt, np.int64(ix[t + 3]) * KP, a[ix[t + 3]])
            t += 4
        while t < n:
            axpy16(acc, 0, wt, np.int64(ix[t]) * KP, a[ix[t]])
            t += 1
        for j in range(out.shape[0]):
            out[j] = (acc[0, j] + acc[1, j]) + (acc[2, j] + acc[3, j]) + bias_h[j]

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def forward_kernel(base, base_idx, lnw, lnb, affine, weight, bias, ks, n_sparse, order, logits, state, idx):
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
        kp = KP
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
        thr = bits_to_f32(thr_bits)
        if affine:
            if tie < 0:
                for i in range(m):
                    t = fma(x[i], lnw_h[i], lnb_h[i])
                    kf[i] = np.float32(1.0) if abs(t) >= thr else np.float32(0.0)
                    sp[i] = t * kf[i]
            else:
                for i in range(m):
                    t = fma(x[i], lnw_h[i], lnb_h[i])
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
                    sp[i] = abs(fma(x[i], lnw_h[i], lnb_h[i]))
            else:
                for i in range(m):
                    sp[i] = abs(x[i])
            _apply_ties(sp, kf, m, thr, tie)
            if affine:
                for i in range(m):
                    sp[i] = fma(x[i], lnw_h[i], lnb_h[i]) * kf[i]
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
                ai = fma(xi, lnw_h[i], lnb_h[i])
            else:
                ai = xi
            if need_w:
                axpy16(blk_wt, np.int64(i) * KP, g16, 0, ai)
            if need_a:
                s = dot16(g16, 0, wt, np.int64(i) * KP)
                if need_lnb:
                    blk_lnb[i] += s
                if need_lnw:
                    blk_lnw[i] += s * xi
                if need_base:
                    gb_row[i] = s * lnw_h[i] if affine else s

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def backward_kernel(
        base, base_idx, lnw, lnb, affine, weight, ks, n_sparse, order, state, idx, grad,
        need_w, need_b, need_lnw, need_lnb, need_base,
        g_w, g_b, g_lnw, g_lnb, g_base,
    ):  # fmt: skip
        n_heads, n_cls, m = weight.shape
        n_rows = grad.shape[1]
        need_a = need_lnw or need_lnb or need_base
        kp = KP
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
                                    sp[i] = fma(x[i], lnw_h[i], lnb_h[i])
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
    def cross_entropy_kernel(logits, target, scale, grad, loss_rows):
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
