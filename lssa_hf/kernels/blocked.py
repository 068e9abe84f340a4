"""Exact, memory-efficient LSSA / LSSAR for every device: query strips, recompute in backward.

Queries are processed in blocks of rows ("strips"); a strip sees all keys its rows may see, so every
row statistic (softplus row sum S, row mean mu, row max) is exact in one pass and no online
rescaling is needed. A strip is sized so that heads x rows x visible-keys stays under a fixed element
budget: memory is linear in L, never L x L. Causal strips are cut at the last visible key
(the upper triangle is never computed); mask strips are cut to the span of visible keys.

Per row (c = log(d) log(N) is folded into the query, so s_j = <c q^, k^_j>):
  sp_j = softplus(s_j)  (masked scores are -inf, so sp = 0 and sigmoid = 0 there)
  LSSA : w_j = sp_j
  LSSAR: w_j = relu((sp_j - m) / scale)^P with m = S/N if N > 3 else 0 and scale = max_j sp_j - m,
         so the largest weight is 1 and w never overflows. This is relu(N*A_j - O)^p up to a row
         constant. Rows with no mass (max_j sp_j at most m (1 + tol), tol = ``functional.tie_tolerance``:
         max N*A - 1 within rounding of zero; tied rows, or N = 0) fall back to LSSA weights sp_j
         (in backward: P = 1, scale = 1, no mean term).
  out = sum_j w_j v_j / W,  W = sum_j w_j.
Rows whose scores all underflow softplus (``functional.underflow_shift``) take sp_j = exp(s_j - r) and
sigmoid_j = sp_j, r their largest score: a second pass, run only when the first one finds such rows.
Backward (g_j = <dout, v_j>, D = <dout, out>):
  LSSA : ds_j = (g_j - D) / S * sigmoid(s_j)
  LSSAR: h_j = (u_j)^(P-1) (g_j - D), coef = P / (W scale), Gamma = sum_j h_j,
         ds_j = coef (h_j - [N > 3] Gamma / N) sigmoid(s_j)
         (the Gamma term is the gradient through mu = S/N, which every visible score shares);
         for fp16 / bf16 inputs u^(P-1) is u^P / max(u, floor) (``functional.grad_floor``: the
         derivative p / t of the log-weight capped at 1 / eps; t = u scale / m).
"""

from __future__ import annotations

import collections
import math
import weakref

import torch

from ..functional import (FLAG_BELOW, as_4d, grad_floor, scaled_unit_qk, tie_tolerance, underflow_shift,
                          visible_counts)
from ..settings import DEFAULT_P

# Elements per strip (all batches and heads together). 1M fp32 = 4 MiB per strip temporary, i.e.
# about one L2 cache per thread: measured fastest on CPU among 256K..16M (big strips spill to L3).
DEFAULT_BUDGET = 1 << 20
GPU_BUDGET = 1 << 26  # GPUs want fewer, bigger launches: 256 MiB per fp32 strip temporary
MIN_BLOCK_Q, MAX_BLOCK_Q = 64, 1024  # thinner strips make GEMMs and dk/dv accumulation inefficient


SPAN_ROWS = 16  # rows per group whose visible-key span is computed together


def _mask_spans(mask4, lq: int, lk: int):
    """Per-row [lo, hi) key span, taken over groups of SPAN_ROWS rows and over batches and heads
    (a superset of each row's span; the strip mask handles the rest). One pass over the mask,
    reducing across rows (vectorised over keys), in chunks: no L x L temporary."""
    groups = -(-lq // SPAN_ROWS)
    lo = torch.empty(groups, dtype=torch.long)
    hi = torch.empty(groups, dtype=torch.long)
    chunk = max(1, (1 << 22) // max(1, lk * SPAN_ROWS))  # groups per chunk
    for g0 in range(0, groups, chunk):
        r0, r1 = g0 * SPAN_ROWS, min(lq, (g0 + chunk) * SPAN_ROWS)
        part = mask4[:, :, r0:r1]
        part = part.any(0, keepdim=True) if part.shape[0] > 1 else part
        part = part.any(1, keepdim=True) if part.shape[1] > 1 else part
        part = part[0, 0]
        pad = (-(r1 - r0)) % SPAN_ROWS
        if pad:
            part = torch.cat([part, part.new_zeros(pad, lk)])
        seen = part.unflatten(0, (-1, SPAN_ROWS)).any(1).view(torch.uint8)  # (groups, Lk)
        any_row = seen.amax(-1) > 0
        # argmax returns the first maximum: first visible key, and (flipped) the last one
        lo[g0:g0 + chunk] = torch.where(any_row, seen.argmax(-1), lk).cpu()  # lk, 0: empty group
        hi[g0:g0 + chunk] = torch.where(any_row, lk - seen.flip(-1).argmax(-1), 0).cpu()
    return lo.repeat_interleave(SPAN_ROWS)[:lq], hi.repeat_interleave(SPAN_ROWS)[:lq]


def _plan(mask4, b: int, hq: int, lq: int, lk: int, block_q, budget: int):
    """List of (q0, q1, k0, k1, needs_mask): query strips and the key span they can see.

    Strips with no visible key are left out (their rows stay zero); empty rows (lo = lk, hi = 0)
    do not widen their strip."""
    if mask4 is None:  # row i sees keys [0, lk - lq + i]
        hi = (torch.arange(lq) + (lk - lq + 1)).clamp(0, lk)
        lo = torch.where(hi > 0, 0, lk)
    else:
        lo, hi = _mask_spans(mask4, lq, lk)
    lo_l, hi_l = lo.tolist(), hi.tolist()
    plan, q0, rows_cost = [], 0, b * hq
    while q0 < lq:
        if block_q is not None:
            bq = block_q
        else:
            width = max(1, hi_l[min(lq - 1, q0)] - lo_l[q0])
            bq = max(MIN_BLOCK_Q, min(MAX_BLOCK_Q, budget // (rows_cost * width)))
            # rows further down may see more keys (causal): shrink to the budget
            width = max(1, max(hi_l[q0:q0 + bq]) - min(lo_l[q0:q0 + bq]))
            bq = max(MIN_BLOCK_Q, min(bq, budget // (rows_cost * width)))
        q1 = min(lq, q0 + bq)
        k0, k1 = min(lo_l[q0:q1]), max(hi_l[q0:q1])
        if k1 > k0:
            if mask4 is None:
                needs_mask = any(h != k1 for h in hi_l[q0:q1])
            else:
                needs_mask = not bool(mask4[:, :, q0:q1, k0:k1].all())
            plan.append((q0, q1, k0, k1, needs_mask))
        q0 = q1
    return plan


def _workspace(qs, plan, hkv):
    """One flat buffer for the score strips: reusing it avoids fresh pages (page faults) per strip."""
    b, hq = qs.shape[:2]
    most = max(((q1 - q0) * (k1 - k0) for q0, q1, k0, k1, _ in plan), default=0)
    return qs.new_empty(b * hq * most)


def _strip_scores(qs5, k, mask4, q0, q1, k0, k1, needs_mask, lq, lk, work=None):
    """Scores s = <c q^, k^> of one strip, (B, Hkv, G*bq, w), -inf where masked; and the query rows.

    ``work``: a buffer from ``_workspace`` to write the scores into (they are then overwritten by
    the next strip, so callers must be done with them)."""
    b, hkv, g, _, d = qs5.shape
    bq, width = q1 - q0, k1 - k0
    qb = qs5[:, :, :, q0:q1].reshape(b, hkv, g * bq, d)
    kt = k[:, :, k0:k1].transpose(-1, -2)
    if work is None:
        s = torch.matmul(qb, kt)
    else:
        s = torch.matmul(qb, kt, out=work[:b * hkv * g * bq * width].view(b, hkv, g * bq, width))
    if needs_mask:
        s5 = s.view(b, hkv, g, bq, width)
        if mask4 is None:
            # only the trailing bq columns can be hidden: row i sees key j <= lk - lq + i
            c0 = max(k0, k1 - bq)
            q_pos = torch.arange(lk - lq + q0, lk - lq + q1, device=s.device)
            blk = torch.arange(c0, k1, device=s.device)[None, :] <= q_pos[:, None]
            s5[..., c0 - k0:].masked_fill_(~blk, -math.inf)
        else:
            blk = mask4[:, :, q0:q1, k0:k1]
            blk = blk.unsqueeze(2) if blk.shape[1] == 1 else blk.unflatten(1, (hkv, g))
            s5.masked_fill_(~blk, -math.inf)
    return s, qb


# ---- per-strip elementwise math (the pure-torch strips; csrc/strips.cpp is the same on CPU) ----
# s: (..., R, w) scores, -inf where masked. Row statistics are (..., R, 1).

# log1p(e) / e on 0 <= e <= 1 as a degree-9 polynomial (Chebyshev fit in float64, lowest degree
# first; ``tests/test_native.py`` refits it): max relative error 5e-9, below fp32 rounding. The
# native fp32 kernels use it (``csrc/strips.cpp``): vectorised log1p is the costliest op of a strip.
LOG1P_RATIO = (0.9999999953848526, -0.49999903992765343, 0.3333000403524574, -0.24954558871284532,
               0.19678117257303596, -0.15311863104930332, 0.10614264691820346, -0.05706420081102007,
               0.019907160954066302, -0.0032563784795137957)


def _softplus(s):
    """relu(s) + log1p(exp(-|s|)): 0 where s = -inf (masked)."""
    return torch.relu(s) + torch.log1p(torch.exp(-s.abs()))


def _base(s, shift):
    """softplus(s), or exp(s - r) on rows with an underflow shift r < 0 (``functional.underflow_shift``);
    ``shift`` None: no row of the strip has one."""
    if shift is None:
        return _softplus(s)
    return torch.where(shift < 0, torch.exp(s - shift), _softplus(s))


def fwd_lssa(s, shift=None):
    """Softplus weights (in place: s is a strip temporary) and their row sum S."""
    w = torch._C._nn.softplus(s, 1.0, 20.0, out=s) if shift is None else _base(s, shift)
    return w, w.sum(-1, keepdim=True)


def fwd_lssar(s, alpha, tie, p: float, shift=None):
    """Weights w = relu((sp - m) / scale)^p (sp on fallback rows), and W = sum w, m, 1/scale, fallback.

    alpha = [N > 3] / N, so m = alpha * S is the row mean (or 0); scale = max sp - m makes the
    largest weight 1. Fallback rows (max sp <= m * tie, tie = 1 + tie tolerance: max N*A - 1 within
    rounding of 0; tied rows, or N = 0) keep LSSA weights."""
    sp = _base(s, shift)
    m = alpha * sp.sum(-1, keepdim=True)
    top = sp.amax(-1, keepdim=True)
    fallback = top <= m * tie
    inv_scale = 1.0 / torch.where(fallback, 1.0, top - m)
    u = torch.relu((sp - m) * inv_scale)
    w = torch.where(fallback, sp, u.pow(p))
    return w, w.sum(-1, keepdim=True), m, inv_scale, fallback


def _softplus_sigmoid(s, shift=None):
    """softplus(s) and sigmoid(s) from one exp(-|s|); on shifted rows both are exp(s - r) (the
    weight base and its derivative, r a constant)."""
    e = torch.exp(-s.abs())
    sp = torch.relu(s) + torch.log1p(e)
    sig = torch.where(s >= 0, 1.0, e) / (1.0 + e)
    if shift is not None:
        shifted = torch.exp(s - shift)
        sp, sig = torch.where(shift < 0, shifted, sp), torch.where(shift < 0, shifted, sig)
    return sp, sig


def bwd_lssa(s, gr, delta, shift=None):
    """Recomputed softplus weights and ds / (1/S): (g - D) * sigmoid(s)."""
    sp, sig = _softplus_sigmoid(s, shift)
    return sp, (gr - delta) * sig


def bwd_lssar(s, gr, delta, m, inv_scale, fallback, alpha, floor_u, p: float, shift=None):
    """Recomputed weights w and ds / coef with coef = P / (W scale) (1 / S on fallback rows).

    h = u^(P-1) (g - D); ds/coef = (h - alpha sum(h)) sigmoid(s): the alpha term is the gradient
    through the row mean m, shared by every visible score. With ``floor_u`` (a row value; None for
    the exact gradient) u^(P-1) becomes u^P / max(u, floor_u): the bounded gradient of half inputs."""
    sp, sig = _softplus_sigmoid(s, shift)
    u = torch.relu((sp - m) * inv_scale)
    if floor_u is None:
        um1 = u.pow(p - 1.0)
        if p <= 1.0:  # relu'(0) = 0, while 0^(p-1) is 1 or inf
            um1 = torch.where(u > 0, um1, 0.0)
        up = um1 * u
    else:
        up = u.pow(p)
        um1 = torch.where(u > 0, up / torch.maximum(u, floor_u), 0.0)
    um1 = torch.where(fallback, 1.0, um1)
    w = torch.where(fallback, sp, up)
    h = um1 * (gr - delta)
    alpha = torch.where(fallback, 0.0, alpha)
    ds = (h - alpha * h.sum(-1, keepdim=True)) * sig
    return w, ds


def alpha_rows(n, b, hkv, g, lq, dtype):
    """alpha = [N > 3] / N per row as a contiguous (B, Hkv, G, Lq) tensor."""
    return _rows(torch.where(n > 3, 1.0 / n.clamp_min(1).to(dtype), 0.0).to(dtype), b, hkv, g, lq)


def tie_rows(n, b, hkv, g, lq, dtype):
    """1 + tie tolerance per row (B, Hkv, G, Lq): LSSAR rows with max sp <= m * this have no mass."""
    return _rows((1.0 + tie_tolerance(n.to(dtype), dtype)).to(dtype), b, hkv, g, lq)


def forward_strips(qs, k, v, mask4, n, variant, p, plan, shift=None):
    """out = LSSA/LSSAR(qs, k, v) where qs = c * unit(q), k = unit(k), in pure torch; and the
    per-row statistics backward needs: LSSA S; LSSAR W, m, 1/scale, fallback (nstat, B, Hkv, G, Lq).
    ``shift``: per-row underflow shifts (B, Hkv, G, Lq) from ``underflow_shifts``, or None."""
    b, hq, lq, d = qs.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    qs5 = qs.view(b, hkv, g, lq, d)
    alpha5 = alpha_rows(n, b, hkv, g, lq, qs.dtype)
    tie5 = tie_rows(n, b, hkv, g, lq, qs.dtype)
    out = qs.new_zeros(b, hkv, g, lq, dv)
    work = _workspace(qs, plan, hkv)
    nstat = 1 if variant == "lssa" else 4  # LSSA: S.  LSSAR: W, m, 1/scale, fallback
    stats = qs.new_zeros(nstat, b, hkv, g, lq)
    if variant == "lssar":
        stats[2].fill_(1.0)
        stats[3].fill_(1.0)  # rows outside the plan (no visible key) are fallback rows

    def rows(t, q0, q1):  # (B, Hkv, G, Lq) -> (B, Hkv, G*bq, 1)
        return t[:, :, :, q0:q1].reshape(b, hkv, g * (q1 - q0), 1)

    for q0, q1, k0, k1, needs_mask in plan:
        bq = q1 - q0
        s, _ = _strip_scores(qs5, k, mask4, q0, q1, k0, k1, needs_mask, lq, lk, work)
        r = _strip_shift(shift, rows, q0, q1)
        if variant == "lssa":
            w, *row_stats = fwd_lssa(s, r)  # row_stats: S
        else:  # row_stats: W, m, 1/scale, fallback
            w, *row_stats = fwd_lssar(s, rows(alpha5, q0, q1), rows(tie5, q0, q1), p, r)
        del s
        o = torch.matmul(w, v[:, :, k0:k1])  # S apart: a ones column on v made this GEMM slower
        for i, x in enumerate(row_stats):
            stats[i, :, :, :, q0:q1] = x.reshape(b, hkv, g, bq)
        o = o / row_stats[0].clamp_min(torch.finfo(w.dtype).tiny)
        out[:, :, :, q0:q1] = o.view(b, hkv, g, bq, dv)
        del w, o
    return out.view(b, hq, lq, dv), stats


def backward_strips(dout, qs, k, v, out, stats, mask4, n, variant, p, plan, floor=0.0, shift=None):
    """Gradients (dqs, dk, dv) of ``forward_strips``, recomputing each strip (pure torch);
    ``floor`` > 0 bounds the re-weighting gradient (``functional.grad_floor`` of the input dtype)."""
    b, hq, lq, d = qs.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    qs5 = qs.view(b, hkv, g, lq, d)
    alpha5 = alpha_rows(n, b, hkv, g, lq, qs.dtype)
    dout = dout.to(qs.dtype)
    dout5 = dout.reshape(b, hkv, g, lq, dv)
    delta5 = (dout * out).sum(-1).view(b, hkv, g, lq)  # D_i = <dout_i, out_i>
    dq5 = torch.zeros_like(qs5)
    dk, dv_ = torch.zeros_like(k), torch.zeros_like(v)
    tiny = torch.finfo(qs.dtype).tiny
    work = _workspace(qs, plan, hkv)

    def rows(t, q0, q1):
        return t[:, :, :, q0:q1].reshape(b, hkv, g * (q1 - q0), 1)

    for q0, q1, k0, k1, needs_mask in plan:
        bq = q1 - q0
        s, qb = _strip_scores(qs5, k, mask4, q0, q1, k0, k1, needs_mask, lq, lk, work)
        do = dout5[:, :, :, q0:q1].reshape(b, hkv, g * bq, dv)
        gr = torch.matmul(do, v[:, :, k0:k1].transpose(-1, -2))  # g_j = <dout, v_j>
        total = rows(stats[0], q0, q1)
        # 0 on rows without visible keys: 1 / tiny times a large upstream gradient overflows to inf,
        # and inf * 0 (their weights) poisons dv with NaN
        inv_total = torch.where(total > 0, 1.0 / total.clamp_min(tiny), 0.0)
        r = _strip_shift(shift, rows, q0, q1)
        if variant == "lssa":
            w, ds = bwd_lssa(s, gr, rows(delta5, q0, q1), r)
            coef = inv_total
        else:
            m, inv_scale, fallback = rows(stats[1], q0, q1), rows(stats[2], q0, q1), rows(stats[3], q0, q1)
            fallback = fallback.bool()
            floor_u = floor * m * inv_scale if floor else None  # t = floor in units of u (0 if N <= 3)
            w, ds = bwd_lssar(s, gr, rows(delta5, q0, q1), m, inv_scale, fallback, rows(alpha5, q0, q1),
                              floor_u, p, r)
            coef = torch.where(fallback, 1.0, p * inv_scale) * inv_total
        del s, gr
        # per-row coefficients go on the small operands, not on the strip
        dq5[:, :, :, q0:q1] += (torch.matmul(ds, k[:, :, k0:k1]) * coef).view(b, hkv, g, bq, d)
        # accumulate inside the GEMM (beta = 1): no temporary, no extra pass over dk / dv
        dk[:, :, k0:k1].flatten(0, 1).baddbmm_(ds.transpose(-1, -2).flatten(0, 1), (qb * coef).flatten(0, 1))
        dv_[:, :, k0:k1].flatten(0, 1).baddbmm_(w.transpose(-1, -2).flatten(0, 1),
                                                (do * inv_total).flatten(0, 1))
        del w, ds
    return dq5.view(b, hq, lq, d), dk, dv_


def _strip_shift(shift, rows, q0, q1):
    """The strip's rows of ``shift``, or None where none of them is shifted (the common case)."""
    if shift is None:
        return None
    r = rows(shift, q0, q1)
    return r if bool((r < 0).any()) else None


# ---- underflow shifts (functional.underflow_shift): found after a first pass, which is rarely needed

# strip-kernel calls that needed a second pass, and the rows they shifted (all backends but the
# materialised one and flex): tells whether a model's evaluation ever met the case
underflow_counts: collections.Counter = collections.Counter()


def flagged_rows(stats, n, variant):
    """(B, Hkv, G, Lq) bool: rows with visible keys whose largest softplus score was below
    ``functional.FLAG_BELOW`` in the first pass (from its statistics: LSSA S; LSSAR W, m, 1/scale, fallback)."""
    b, hkv, g, lq = stats.shape[1:]
    nr = _rows(n.to(stats.dtype), b, hkv, g, lq)
    if variant == "lssa":  # max sp <= S
        return (nr > 0) & (stats[0] < nr * FLAG_BELOW)
    total, m, inv_scale, fallback = stats
    top = m + 1.0 / inv_scale  # scale = max sp - m on rows with re-weighted mass
    return (nr > 0) & torch.where(fallback > 0, total < nr * FLAG_BELOW, top < FLAG_BELOW)


def mask_visibility(mask4, lq: int, lk: int):
    """visibility(b, heads, rows) -> (R, Lk) bool of query rows ``rows`` (query heads ``heads``) of
    batch ``b``, from a (Bm, Hm, Lq, Lk) mask, or None: causal with queries aligned to the last keys."""
    def visibility(bi, heads, qr):
        if mask4 is None:
            return torch.arange(lk, device=qr.device)[None, :] <= (qr + (lk - lq))[:, None]
        heads = heads if mask4.shape[1] > 1 else torch.zeros_like(heads)
        return mask4[bi if mask4.shape[0] > 1 else 0][heads, qr]
    return visibility


def underflow_shifts(qs, k, flagged, visibility, budget: int = DEFAULT_BUDGET):
    """Per-row shifts (B, Hkv, G, Lq): ``functional.underflow_shift`` of the largest visible score of
    each flagged row, 0 elsewhere; None if no row needs one. Scores of the flagged rows only, in chunks
    of ``budget`` elements; ``visibility`` as from ``mask_visibility``."""
    b, hq, lq, d = qs.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    shift = qs.new_zeros(b, hkv, g, lq)
    qs5 = qs.view(b, hkv, g, lq, d)
    step = max(1, budget // max(1, lk))
    for bi, hi in flagged.any(-1).any(-1).nonzero().tolist():
        gi, qi = flagged[bi, hi].nonzero(as_tuple=True)
        for c0 in range(0, gi.numel(), step):
            gc, qc = gi[c0:c0 + step], qi[c0:c0 + step]
            s = qs5[bi, hi, gc, qc] @ k[bi, hi].transpose(0, 1)  # (rows, Lk)
            visible = visibility(bi, hi * g + gc, qc)
            shift[bi, hi, gc, qc] = underflow_shift(torch.where(visible, s, -math.inf).amax(-1))
    rows = int((shift < 0).sum())
    if rows:
        underflow_counts["calls"] += 1
        underflow_counts["rows"] += rows
    return shift if rows else None


def _rows(n, b, hkv, g, lq):
    """(Bm, Hm, Lq) per-row values -> contiguous (B, Hkv, G, Lq)."""
    if n.shape[1] == 1:
        return n.view(n.shape[0], 1, 1, lq).expand(b, hkv, g, lq).contiguous()
    return n.view(n.shape[0], hkv, g, lq).expand(b, hkv, g, lq).contiguous()


_plan_cache: list = []  # [(key, weakref to mask or None, n, plan)], most recent last


def _cached_plan(mask, mask4, b, hq, lq, lk, block_q, budget, device):
    """N_i and the strip plan. Scanning a mask costs a few passes over B*L*L bytes, and a model
    passes the same mask object to every layer: reuse the result while that very tensor (same
    object, unmodified: same ``_version``) comes back. The implicit causal mask is keyed by shape."""
    try:
        version = -1 if mask is None else mask._version
    except RuntimeError:  # inference tensors have no version counter: do not cache
        version = None
    if version is None:
        return visible_counts(mask4, lq, lk, device), _plan(mask4, b, hq, lq, lk, block_q, budget)
    key = (None if mask is None else id(mask), version, b, hq, lq, lk, block_q, budget, device)
    for entry in _plan_cache:
        if entry[0] == key and (mask is None or entry[1]() is mask):
            return entry[2], entry[3]
    n, plan = visible_counts(mask4, lq, lk, device), _plan(mask4, b, hq, lq, lk, block_q, budget)
    _plan_cache.append((key, None if mask is None else weakref.ref(mask), n, plan))
    del _plan_cache[:-4]
    return n, plan


def blocked_attention(query, key, value, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P,
                      block_q: int | None = None, budget: int | None = None, temperature=None,
                      impl: str = "torch") -> torch.Tensor:
    """LSSA/LSSAR output (B, Hq, Lq, Dv) in the input dtype, without any L x L tensor.

    The strip loop runs inside the custom ops of ``kernels/ops.py`` (``torch.compile`` traces one op
    per pass). ``impl``: "torch" (these pure-torch strips) or "native" (the C++ strips of
    ``native.py`` where they run: CPU, float32/float64). ``block_q`` fixes the strip height (default:
    sized to ``budget`` elements per strip); ``temperature`` (Hq values) multiplies each head's length
    scale, and autograd reaches it through the scaled query."""
    from . import ops  # ops runs this module's strips

    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if budget is None:
        budget = DEFAULT_BUDGET if query.device.type == "cpu" else GPU_BUDGET
    if mask is None:
        n = visible_counts(None, lq, lk, query.device)
    else:
        mask = mask.to(query.device)
        n = ops.counts(mask, b, hq, lq, lk, block_q, budget)
    qs, k = scaled_unit_qk(query, key, n, temperature)
    out = ops.strips(qs.contiguous(), k.contiguous(), value.to(qs.dtype).contiguous(), mask, n, variant,
                     float(p), grad_floor(float(p), query.dtype), block_q, budget, impl)
    return out.to(query.dtype)
