"""Triton kernels of LSSA / LSSAR (forward, dq, dk/dv). Host code: ``triton_lssa.py``.

This module is loaded twice by ``triton_lssa`` (once compiled, once for Triton's CPU interpreter),
so it holds only ``@triton.jit`` functions and constants. Per query row the kernels see the unit
key rows k^_j and the scaled unit query c q^ (c = tau log(d) log(N), folded in on the host), the
row's visible key span [lo, hi) and, optionally, a boolean mask inside it. The maths is the one of
``blocked.py`` (see its docstring); statistics are exact per row (LSSAR: one statistics pass over
the keys, then the weighted pass), so nothing is rescaled online.

Matmul operand precisions: 0 fp32, 1 tf32, 2 fp16, 3 bf16, 4 tf32x3 (three tf32 products); the
accumulation is always fp32. On GPU fp32 runs as tf32x3; the interpreter multiplies fp32 exactly for
0 (fast: the tests) and emulates tf32x3 for 4 (the precision measurement). ``QK_PREC``: the scores
q.k; ``O_PREC``: the output w.v; ``V_PREC``: the backward matmuls with v or dout (dout.v, w.dout);
``G_PREC``: the gradient matmuls ds.k and ds.q. ``EMULATE`` (the interpreter) rounds operands to their precision and
multiplies in fp32: the interpreter cannot multiply bf16 tensors, and products of rounded operands
are exact in fp32, so this is the tensor-core arithmetic.
"""

import triton
import triton.language as tl

from .blocked import LOG1P_RATIO

# log1p(e) / e on [0, 1] (blocked.LOG1P_RATIO, relative error 5e-9): FMAs instead of a log
_C0, _C1, _C2, _C3, _C4 = (tl.constexpr(c) for c in LOG1P_RATIO[:5])
_C5, _C6, _C7, _C8, _C9 = (tl.constexpr(c) for c in LOG1P_RATIO[5:])
_TINY = tl.constexpr(1.1754943508222875e-38)  # fp32 smallest normal


# Reductions through tl.reduce with triton's own combine functions: tl.sum / tl.max / tl.min are
# @jit functions fixed as compiled or interpreted when triton is imported, while these calls work in
# both modes (the interpreter recognises the combine functions and reduces with numpy).
@triton.jit
def _sum(x, axis):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _round(x, PREC: tl.constexpr):
    """x (fp32) rounded to the operand precision PREC, kept in fp32."""
    x = x.to(tl.float32)
    if PREC == 1:  # tf32: 10 mantissa bits, round half away from zero
        x = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    elif PREC == 2:
        x = x.to(tl.float16).to(tl.float32)
    elif PREC == 3:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _dot(a, b, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b with operands in precision PREC, fp32 accumulation."""
    if EMULATE and PREC == 4:  # tf32x3 exactly: a = hi + lo in tf32 each, lo * lo dropped
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        ah, bh = _round(a, 1), _round(b, 1)
        al, bl = _round(a - ah, 1), _round(b - bh, 1)
        out = (tl.dot(ah, bl, input_precision="ieee") + tl.dot(al, bh, input_precision="ieee")
               + tl.dot(ah, bh, input_precision="ieee"))
    elif EMULATE:
        out = tl.dot(_round(a, PREC), _round(b, PREC), input_precision="ieee")
    elif PREC == 0 or PREC == 4:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    elif PREC == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif PREC == 2:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return out


@triton.jit
def _softplus_sigmoid(s):
    """softplus(s) = relu(s) + log1p(e) and sigmoid(s), from one e = exp(-|s|)."""
    e = tl.exp(-tl.abs(s))
    r = _C9 * e + _C8
    r = r * e + _C7
    r = r * e + _C6
    r = r * e + _C5
    r = r * e + _C4
    r = r * e + _C3
    r = r * e + _C2
    r = r * e + _C1
    r = r * e + _C0
    sp = tl.maximum(s, 0.0) + e * r
    sig = tl.where(s >= 0, 1.0, e) / (1.0 + e)
    return sp, sig


@triton.jit
def _shifted(s, sp, sig, r):
    """On rows with an underflow shift r < 0 (functional.underflow_shift) the weight base and its
    derivative are both exp(s - r); other rows keep (sp, sig)."""
    e = tl.exp(tl.where(r[:, None] < 0, s - r[:, None], 0.0))  # s <= r = max s there; others: no overflow
    return tl.where(r[:, None] < 0, e, sp), tl.where(r[:, None] < 0, e, sig)


@triton.jit
def _pow(u, p):
    """u^p for u >= 0, p > 0 (0 where u = 0), in fp32 through exp2/log2."""
    return tl.where(u > 0, tl.exp2(p * tl.log2(tl.maximum(u, _TINY))), 0.0)


@triton.jit
def _visible(offs_m, offs_n, lo, hi, mask_ptr, smq, smk, Lq, Lk, HAS_MASK: tl.constexpr):
    """(BM, BN) visibility: inside the row's span [lo, hi), and the mask where one is given."""
    vis = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    if HAS_MASK:
        ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        m = tl.load(mask_ptr + offs_m[:, None] * smq + offs_n[None, :] * smk, mask=ok, other=0)
        vis = vis & (m != 0)
    return vis


@triton.jit
def _lssar_weights(sp, m, inv_scale, fallback, p):
    """LSSAR weights relu((sp - m) / scale)^p, LSSA weights sp on fallback rows."""
    u = tl.maximum((sp - m[:, None]) * inv_scale[:, None], 0.0)
    return tl.where(fallback[:, None], sp, _pow(u, p))


@triton.jit
def _span(LO, HI, row_off, rows, Lk, BN: tl.constexpr):
    """Rows' spans [lo, hi) and the key range of the block, from BN-aligned k_lo to k_hi."""
    lo = tl.load(LO + row_off, mask=rows, other=Lk)
    hi = tl.load(HI + row_off, mask=rows, other=0)
    return lo, hi, (_min(lo, 0) // BN) * BN, _max(hi, 0)


@triton.jit
def _key_tile(q, kb, skn, n0, offs_m, offs_d, lo, hi, mask_ptr, smq, smk, Lq, Lk, r, D: tl.constexpr,
              HAS_MASK: tl.constexpr, QK_PREC: tl.constexpr, EMULATE: tl.constexpr, BN: tl.constexpr,
              HAS_SHIFT: tl.constexpr):
    """Key tile at n0: (offs_n, k^T tile, visibility, softplus and sigmoid of the scores, 0 where hidden);
    r: the rows' underflow shifts (HAS_SHIFT)."""
    offs_n = n0 + tl.arange(0, BN)
    kt = tl.load(kb + offs_n[None, :] * skn + offs_d[:, None],
                 mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
    vis = _visible(offs_m, offs_n, lo, hi, mask_ptr, smq, smk, Lq, Lk, HAS_MASK)
    s = _dot(q, kt, QK_PREC, EMULATE)
    sp, sig = _softplus_sigmoid(s)
    if HAS_SHIFT:
        sp, sig = _shifted(s, sp, sig, r)
    return offs_n, kt, vis, tl.where(vis, sp, 0.0), tl.where(vis, sig, 0.0)


@triton.jit
def _query_block(Q, LO, HI, sqb, sqh, sqm, srb, srh, Lq, Lk, HQ, D: tl.constexpr, BD: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """This program's batch, head, query rows, their spans and the (BM, BD) query tile."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    rows = offs_m < Lq
    row_off = b * srb + h * srh + offs_m
    lo, hi, k_lo, k_hi = _span(LO, HI, row_off, rows, Lk, BN)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=rows[:, None] & (offs_d[None, :] < D), other=0.0)
    return b, h, offs_m, rows, row_off, lo, hi, k_lo, k_hi, q


@triton.jit
def _row_shift(shift_ptr, offs, rows, HAS_SHIFT: tl.constexpr, BM: tl.constexpr):
    """The rows' underflow shifts ((B*HQ, Lq) at SHIFT), zeros without them."""
    if HAS_SHIFT:
        return tl.load(shift_ptr + offs, mask=rows, other=0.0)
    return tl.full([BM], 0.0, dtype=tl.float32)


@triton.jit
def _saved_stats(stat, plane, rows, LSSAR: tl.constexpr, BM: tl.constexpr):
    """Forward row statistics (W, m, 1/scale, fallback) at ``stat``; LSSA rows are fallback rows."""
    wsum = tl.load(stat, mask=rows, other=0.0)
    if LSSAR:
        m = tl.load(stat + plane, mask=rows, other=0.0)
        inv_scale = tl.load(stat + 2 * plane, mask=rows, other=1.0)
        fallback = tl.load(stat + 3 * plane, mask=rows, other=1.0) != 0.0
    else:
        m = tl.full([BM], 0.0, dtype=tl.float32)
        inv_scale = m + 1.0
        fallback = m == 0.0
    return wsum, m, inv_scale, fallback


@triton.jit
def _fwd_kernel(Q, K, V, O, LO, HI, ALPHA, STATS, MASK, SHIFT,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                srb, srh, smb, smh, smq, smk, Lq, Lk, HQ, G, p, tie_eps, tie_terms,
                LSSAR: tl.constexpr, HAS_MASK: tl.constexpr, QK_PREC: tl.constexpr, O_PREC: tl.constexpr,
                EMULATE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """One block of BM query rows of one head: out = sum_j w_j v_j / W, and the row statistics."""
    pid_bh = tl.program_id(1)
    offs_d, offs_dv = tl.arange(0, BD), tl.arange(0, BDV)
    b, h, offs_m, rows, row_off, lo, hi, k_lo, k_hi, q = _query_block(Q, LO, HI, sqb, sqh, sqm, srb, srh, Lq, Lk,
                                                                      HQ, D, BD, BM, BN)
    kb = K + b * skb + (h // G) * skh
    vb = V + b * svb + (h // G) * svh
    mask_ptr = MASK + b * smb + h * smh
    r = _row_shift(SHIFT, pid_bh * Lq + offs_m, rows, HAS_SHIFT, BM)
    m = tl.full([BM], 0.0, dtype=tl.float32)
    inv_scale = tl.full([BM], 1.0, dtype=tl.float32)
    fallback = m == 0.0
    if LSSAR:  # statistics pass: S (-> row mean m) and the row max of sp
        alpha = tl.load(ALPHA + row_off, mask=rows, other=0.0)
        total = tl.full([BM], 0.0, dtype=tl.float32)
        top = tl.full([BM], 0.0, dtype=tl.float32)
        for n0 in range(k_lo, k_hi, BN):
            _, _, _, sp, _ = _key_tile(q, kb, skn, n0, offs_m, offs_d, lo, hi, mask_ptr, smq, smk, Lq, Lk, r, D,
                                       HAS_MASK, QK_PREC, EMULATE, BN, HAS_SHIFT)
            total += _sum(sp, 1)
            top = tl.maximum(top, _max(sp, 1))
        m = alpha * total
        # no re-weighted mass within rounding (functional.tie_tolerance: tie_eps (N + tie_terms), N = 1/alpha)
        tie = tl.where(alpha > 0, 1.0 + tie_eps * (1.0 / tl.maximum(alpha, _TINY) + tie_terms), 1.0)
        fallback = top <= m * tie
        inv_scale = 1.0 / tl.where(fallback, 1.0, top - m)
    acc = tl.full([BM, BDV], 0.0, dtype=tl.float32)
    wsum = tl.full([BM], 0.0, dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BN):
        offs_n, _, _, sp, _ = _key_tile(q, kb, skn, n0, offs_m, offs_d, lo, hi, mask_ptr, smq, smk, Lq, Lk, r, D,
                                        HAS_MASK, QK_PREC, EMULATE, BN, HAS_SHIFT)
        w = sp
        if LSSAR:
            w = _lssar_weights(sp, m, inv_scale, fallback, p)
        wsum += _sum(w, 1)
        v = tl.load(vb + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(w, v, O_PREC, EMULATE)
    out = acc / tl.maximum(wsum, _TINY)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :], out,
             mask=rows[:, None] & (offs_dv[None, :] < DV))
    stat = STATS + pid_bh * Lq + offs_m  # (NSTAT, B*HQ, Lq)
    plane = HQ * Lq * (tl.num_programs(1) // HQ)
    tl.store(stat, wsum, mask=rows)
    if LSSAR:
        tl.store(stat + plane, m, mask=rows)
        tl.store(stat + 2 * plane, inv_scale, mask=rows)
        tl.store(stat + 3 * plane, fallback.to(tl.float32), mask=rows)


@triton.jit
def _row_terms(sp, sig, gr, delta, m, inv_scale, fallback, p, floor, LSSAR: tl.constexpr):
    """(weights w, h = u^(P-1) (g - D)) of one tile; P = 1 (h = g - D) for LSSA and fallback rows.
    floor > 0 (half inputs) bounds the gradient: u^(P-1) -> u^P / max(u, floor m / scale)."""
    if LSSAR:
        u = tl.maximum((sp - m[:, None]) * inv_scale[:, None], 0.0)
        floor_u = (floor * m * inv_scale)[:, None]
        up = _pow(u, p)
        bounded = tl.where(u > 0, up / tl.maximum(tl.maximum(u, floor_u), _TINY), 0.0)
        um1 = tl.where(fallback[:, None], 1.0, tl.where(floor_u > 0, bounded, _pow(u, p - 1.0)))
        w = tl.where(fallback[:, None], sp, tl.where(floor_u > 0, up, um1 * u))
    else:
        um1 = tl.full(sp.shape, 1.0, dtype=tl.float32)
        w = sp
    return w, um1 * (gr - delta[:, None])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, GAMMA, LO, HI, ALPHA, STATS, DELTA, MASK, SHIFT,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                   srb, srh, smb, smh, smq, smk, Lq, Lk, HQ, G, p, floor,
                   LSSAR: tl.constexpr, HAS_MASK: tl.constexpr, QK_PREC: tl.constexpr, V_PREC: tl.constexpr,
                   G_PREC: tl.constexpr, EMULATE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                   BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """dq of one query block: coef (sum_j h_j sig_j k_j - alpha Gamma sum_j sig_j k_j); stores Gamma."""
    pid_bh = tl.program_id(1)
    offs_d, offs_dv = tl.arange(0, BD), tl.arange(0, BDV)
    b, h, offs_m, rows, row_off, lo, hi, k_lo, k_hi, q = _query_block(Q, LO, HI, sqb, sqh, sqm, srb, srh, Lq, Lk,
                                                                      HQ, D, BD, BM, BN)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :],
                 mask=rows[:, None] & (offs_dv[None, :] < DV), other=0.0)
    plane = HQ * Lq * (tl.num_programs(1) // HQ)
    wsum, m, inv_scale, fallback = _saved_stats(STATS + pid_bh * Lq + offs_m, plane, rows, LSSAR, BM)
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=rows, other=0.0)
    r = _row_shift(SHIFT, pid_bh * Lq + offs_m, rows, HAS_SHIFT, BM)
    kb = K + b * skb + (h // G) * skh
    vb = V + b * svb + (h // G) * svh
    mask_ptr = MASK + b * smb + h * smh
    acc_h = tl.full([BM, BD], 0.0, dtype=tl.float32)  # sum_j h_j sig_j k_j
    acc_s = tl.full([BM, BD], 0.0, dtype=tl.float32)  # sum_j sig_j k_j (LSSAR: the row-mean term)
    gamma = tl.full([BM], 0.0, dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BN):
        offs_n, kt, vis, sp, sig = _key_tile(q, kb, skn, n0, offs_m, offs_d, lo, hi, mask_ptr, smq, smk, Lq, Lk,
                                             r, D, HAS_MASK, QK_PREC, EMULATE, BN, HAS_SHIFT)
        vt = tl.load(vb + offs_n[None, :] * svn + offs_dv[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV), other=0.0)
        gr = _dot(do, vt, V_PREC, EMULATE)
        _, hh = _row_terms(sp, sig, gr, delta, m, inv_scale, fallback, p, floor, LSSAR)
        hh = tl.where(vis, hh, 0.0)
        acc_h += _dot(hh * sig, tl.trans(kt), G_PREC, EMULATE)
        if LSSAR:
            gamma += _sum(hh, 1)
            acc_s += _dot(sig, tl.trans(kt), G_PREC, EMULATE)
    inv_w = tl.where(wsum > 0, 1.0 / tl.maximum(wsum, _TINY), 0.0)  # 0: rows with no visible key
    if LSSAR:
        alpha = tl.load(ALPHA + row_off, mask=rows, other=0.0)
        alpha = tl.where(fallback, 0.0, alpha)
        coef = tl.where(fallback, 1.0, p * inv_scale) * inv_w
        dq = coef[:, None] * (acc_h - (alpha * gamma)[:, None] * acc_s)
        tl.store(GAMMA + pid_bh * Lq + offs_m, alpha * gamma, mask=rows)
    else:
        dq = inv_w[:, None] * acc_h
    tl.store(DQ + pid_bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], dq,
             mask=rows[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV_, GAMMA, LO, HI, ALPHA, STATS, DELTA, MASK, SHIFT,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     srb, srh, smb, smh, smq, smk, Lq, Lk, HQ, G, p, floor,
                     LSSAR: tl.constexpr, HAS_MASK: tl.constexpr, QK_PREC: tl.constexpr,
                     V_PREC: tl.constexpr, G_PREC: tl.constexpr, EMULATE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_SHIFT: tl.constexpr):
    """dk, dv of one key block of one KV head, summed over its G query heads and all query blocks."""
    pid_n, pid_bk = tl.program_id(0), tl.program_id(1)
    hkv = HQ // G
    b, hk = pid_bk // hkv, pid_bk % hkv
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d, offs_dv = tl.arange(0, BD), tl.arange(0, BDV)
    cols = offs_n < Lk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=cols[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :],
                mask=cols[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.full([BN, BD], 0.0, dtype=tl.float32)
    dv = tl.full([BN, BDV], 0.0, dtype=tl.float32)
    plane = HQ * Lq * (tl.num_programs(1) // hkv)
    n_lo = pid_n * BN
    for g in range(0, G):
        h = hk * G + g
        bh = b * HQ + h
        mask_ptr = MASK + b * smb + h * smh
        for m0 in range(0, Lq, BM):
            offs_m = m0 + tl.arange(0, BM)
            rows = offs_m < Lq
            row_off = b * srb + h * srh + offs_m
            lo, hi, k_lo, k_hi = _span(LO, HI, row_off, rows, Lk, BN)
            if (k_lo < n_lo + BN) & (k_hi > n_lo):  # some row sees this key block
                qt = tl.load(Q + b * sqb + h * sqh + offs_m[None, :] * sqm + offs_d[:, None],
                             mask=rows[None, :] & (offs_d[:, None] < D), other=0.0)
                dot_ = tl.load(DO + b * sdb + h * sdh + offs_m[None, :] * sdm + offs_dv[:, None],
                               mask=rows[None, :] & (offs_dv[:, None] < DV), other=0.0)
                wsum, mm, inv_scale, fallback = _saved_stats(STATS + bh * Lq + offs_m, plane, rows, LSSAR, BM)
                delta = tl.load(DELTA + bh * Lq + offs_m, mask=rows, other=0.0)
                agamma = tl.load(GAMMA + bh * Lq + offs_m, mask=rows, other=0.0)  # zeros for LSSA
                # tiles are (BM, BN) as in the other kernels, built from transposed loads
                vis = _visible(offs_m, offs_n, lo, hi, mask_ptr, smq, smk, Lq, Lk, HAS_MASK)
                s = tl.trans(_dot(k, qt, QK_PREC, EMULATE))
                sp, sig = _softplus_sigmoid(s)
                if HAS_SHIFT:
                    sp, sig = _shifted(s, sp, sig, _row_shift(SHIFT, bh * Lq + offs_m, rows, HAS_SHIFT, BM))
                sp = tl.where(vis, sp, 0.0)
                sig = tl.where(vis, sig, 0.0)
                gr = tl.trans(_dot(v, dot_, V_PREC, EMULATE))
                w, hh = _row_terms(sp, sig, gr, delta, mm, inv_scale, fallback, p, floor, LSSAR)
                inv_w = tl.where(wsum > 0, 1.0 / tl.maximum(wsum, _TINY), 0.0)  # 0: rows with no visible key
                coef = tl.where(fallback, 1.0, p * inv_scale) * inv_w
                ds = tl.where(vis, (hh - agamma[:, None]) * sig, 0.0) * coef[:, None]
                dk += _dot(tl.trans(ds), tl.trans(qt), G_PREC, EMULATE)
                dv += _dot(tl.trans(w * inv_w[:, None]), tl.trans(dot_), V_PREC, EMULATE)
    tl.store(DK + pid_bk * Lk * D + offs_n[:, None] * D + offs_d[None, :], dk,
             mask=cols[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + pid_bk * Lk * DV + offs_n[:, None] * DV + offs_dv[None, :], dv,
             mask=cols[:, None] & (offs_dv[None, :] < DV))
