"""LSSA / LSSAR with Triton kernels (``backend="triton"``): forward and backward, GPU and interpreter.

The kernels (``_triton_kernels.py``) see, per query row, a visible key span [lo, hi) and optionally
a boolean mask inside it. Causal attention (queries aligned to the last keys), sliding windows,
packed documents (``doc_ids`` / ``cu_seqlens``) and every boolean mask whose rows are intervals
(left/right padding combined with those) run without a mask: only the spans. Other masks are read
tile by tile inside their rows' spans. N_i, the length scale c_i = tau_h log(d) log(N_i) and the unit
normalisation are computed here in torch (autograd takes the gradients through them to q, k and a
learnable temperature); the kernels compute out and d(c q^), d(k^), dv exactly as ``blocked.py``.

Precision (``PRECISION``, ``TRAIN_OUT``; measured in docs/kernels.md,
``benchmarks/triton_precision.py``): fp32 inputs use fp32 operands (tf32x3 on GPU) everywhere.
fp16/bf16 inputs use fp16 operands for the scores q.k (unit vectors times c: 10 mantissa bits, no
range issue), the input dtype for the matmuls with v and dout, except the output w.v when gradients
are needed (the backward's D = <dout, out> must match its fp32 weights: on peaked LSSAR rows the
gradient terms cancel, and bf16 output weights gave errors of several times the gradient), and
fp32 (tf32x3) for the gradient matmuls ds.k, ds.q. Accumulation and elementwise maths are fp32.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1``
(slow: tests only). The module imports triton only when a kernel is first needed.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import sys
import weakref
from pathlib import Path

import torch

from ..functional import DEFAULT_P, TIE_TERMS, TIE_ULPS, as_4d, grad_floor, scaled_unit_qk
from . import blocked

PREC = {"fp32": 0, "tf32": 1, "fp16": 2, "bf16": 3, "tf32x3": 4}
STORAGE = {0: torch.float32, 1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float32}
# operand precision of (scores q.k, output w.v, backward matmuls with v / dout, gradient matmuls
# ds.k and ds.q) per input dtype; training runs w.v in fp32 (TRAIN_OUT): see the module docstring
PRECISION = {torch.float32: ("fp32", "fp32", "fp32", "fp32"), torch.float16: ("fp16", "fp16", "fp16", "fp32"),
             torch.bfloat16: ("fp16", "bf16", "bf16", "fp32")}
TRAIN_OUT = "fp32"
DTYPES = tuple(PRECISION)
MAX_HEAD_DIM = 256
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches (tests spy on it)
_modules: dict = {}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the triton package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unusable_reason(query) -> str | None:
    """Why ``backend="triton"`` cannot run these inputs (None when it can)."""
    if not available():
        return "the triton package is not installed: `pip install lssa-hf[gpu]` (or `pip install triton`)"
    if query.device.type == "cpu" and not interpreting():
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 (slow, for tests), "
                "or use backend='auto' / 'blocked_compiled' on CPU")
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type!r} is not supported: use backend='blocked'"
    if query.dtype not in DTYPES:
        return f"dtype {query.dtype} is not supported (use {', '.join(map(str, DTYPES))}, or backend='blocked')"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}: use backend='blocked'"
    return None


def supports(query) -> bool:
    return unusable_reason(query) is None


def kernels(interpret: bool):
    """The kernel module, compiled or for the interpreter. Triton decides at decoration time, so
    the same source is loaded once per mode: CUDA and interpreted calls can share a process."""
    if interpret not in _modules:
        name = f"{__package__}._triton_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_triton_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        if "triton" not in sys.modules:  # import triton's own library compiled (see _triton_kernels)
            os.environ.pop("TRITON_INTERPRET", None)
            import triton  # noqa: F401
        from triton import knobs

        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            knobs.runtime.interpret = interpret
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            del knobs.runtime.interpret
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _modules[interpret] = module
    return _modules[interpret]


def _launch(name: str, kernel, grid, *args, **meta):
    LAUNCHES[name] += 1
    kernel[grid](*args, **meta)


# ---- layouts: spans, counts, masks ----

def causal_spans(lq: int, lk: int, window: int | None = None, device=None):
    """(lo, hi) of row i: keys lk - lq + i - window < j <= lk - lq + i (all earlier keys: no window)."""
    hi = (torch.arange(lq, device=device) + (lk - lq + 1)).clamp(0, lk)
    lo = (hi - window).clamp_min(0) if window is not None else torch.zeros_like(hi)
    return lo, hi


def doc_spans(doc_ids: torch.Tensor, window: int | None = None):
    """(lo, hi) per (batch, position) for packed documents with causal attention (Lq = Lk):
    ``doc_ids`` (B, L) non-decreasing along L (one id per document, e.g. from cu_seqlens)."""
    if doc_ids.dim() == 1:
        doc_ids = doc_ids[None]
    if (doc_ids[:, 1:] < doc_ids[:, :-1]).any():
        raise ValueError("doc_ids must be non-decreasing along the sequence (contiguous documents).")
    length = doc_ids.shape[-1]
    pos = torch.arange(length, device=doc_ids.device).expand_as(doc_ids)
    start = torch.searchsorted(doc_ids.contiguous(), doc_ids.contiguous(), right=False)
    lo, hi = start, pos + 1
    if window is not None:
        lo = torch.maximum(lo, hi - window)
    return lo, hi


def cu_seqlens_to_doc_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(1, total) document ids from cumulative lengths [0, l0, l0+l1, ...] (flash-attn varlen)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None]


def _mask_rows(mask4, lk: int):
    """(lo, hi, N) of every row of a (Bm, Hm, Lq, Lk) bool mask: first and one-past-last visible
    key and the count (empty rows: lo = lk, hi = 0). Chunked over rows: no L x L temporary."""
    bm, hm, lq, _ = mask4.shape
    lo = torch.empty(bm, hm, lq, dtype=torch.int32, device=mask4.device)
    hi, n = torch.empty_like(lo), torch.empty_like(lo)
    chunk = max(1, (1 << 24) // max(1, bm * hm * lk))
    for r0 in range(0, lq, chunk):
        part = mask4[:, :, r0:r0 + chunk].to(torch.uint8)
        seen = part.amax(-1) > 0
        lo[:, :, r0:r0 + chunk] = torch.where(seen, part.argmax(-1), lk)
        hi[:, :, r0:r0 + chunk] = torch.where(seen, lk - part.flip(-1).argmax(-1), 0)
        n[:, :, r0:r0 + chunk] = part.sum(-1, dtype=torch.int32)
    return lo, hi, n


_layout_cache: list = []  # [(key, weakref to mask, layout)], most recent last


def mask_layout(mask, b: int, hq: int, lq: int, lk: int):
    """(lo, hi, N, mask4 or None) for a bool mask broadcastable to (B, Hq, Lq, Lk). The mask is
    dropped when every row is an interval (causal, windows, padding, packing: then N = hi - lo).
    Cached while the same unmodified mask object comes back (one mask is passed to every layer)."""
    try:
        key = (id(mask), mask._version, b, hq, lq, lk)
    except RuntimeError:  # inference tensors have no version counter
        key = None
    for entry in _layout_cache:
        if key is not None and entry[0] == key and entry[1]() is mask:
            return entry[2]
    mask4 = as_4d(mask, lq, lk)
    lo, hi, n = _mask_rows(mask4, lk)
    dense = bool((n != (hi - lo).clamp_min(0)).any())
    layout = (lo, hi, n, mask4 if dense else None)
    if key is not None:
        _layout_cache.append((key, weakref.ref(mask), layout))
        del _layout_cache[:-4]
    return layout


# ---- autograd ----

def _row_strides(t):
    """Strides (batch, head) of a (Bm, Hm, Lq) row tensor, 0 where broadcast."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _mask_args(mask4, rows):
    if mask4 is None:
        return (rows, 0, 0, 0, 0)
    m = mask4.view(torch.uint8)
    return (m, m.stride(0) if m.shape[0] > 1 else 0, m.stride(1) if m.shape[1] > 1 else 0,
            m.stride(2), m.stride(3))


def _blocks(interpret: bool, d: int):
    if interpret:
        return 16, 16
    return (64, 64) if d > 64 else (128, 64)


class TritonLSSA(torch.autograd.Function):
    """out = LSSA/LSSAR(qs, k, v) with qs = c q^ and k = k^ (fp32); grads for qs, k, v."""

    @staticmethod
    def forward(ctx, qs, k, v, lo, hi, n, alpha, mask4, variant, p, precision, floor):
        b, hq, lq, d = qs.shape
        hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
        interpret = qs.device.type == "cpu" or interpreting()
        mod = kernels(interpret)
        qk_prec, o_prec, v_prec, g_prec = (PREC[x] for x in precision)
        q_in, k_in = qs.to(STORAGE[qk_prec]).contiguous(), k.to(STORAGE[qk_prec]).contiguous()
        v_in = v.to(STORAGE[v_prec]).contiguous()
        lssar = variant == "lssar"
        out = torch.empty(b, hq, lq, dv, device=qs.device, dtype=torch.float32)
        stats = torch.empty(4 if lssar else 1, b * hq, lq, device=qs.device, dtype=torch.float32)
        bm, bn = _blocks(interpret, d)
        meta = dict(LSSAR=lssar, HAS_MASK=mask4 is not None, QK_PREC=qk_prec, O_PREC=o_prec, EMULATE=interpret,
                    D=d, DV=dv, BD=max(16, triton_next_pow2(d)), BDV=max(16, triton_next_pow2(dv)), BM=bm, BN=bn)
        if not interpret:
            meta["num_warps"] = 8 if d > 64 else 4
        margs = _mask_args(mask4, lo)

        def run(shift):
            _launch("fwd", mod._fwd_kernel, (triton_cdiv(lq, bm), b * hq),
                    q_in, k_in, v_in, out, lo, hi, alpha, stats, margs[0], alpha if shift is None else shift,
                    *q_in.stride()[:3], *k_in.stride()[:3], *v_in.stride()[:3], *out.stride()[:3],
                    *_row_strides(lo), *margs[1:], lq, lk, hq, hq // hkv, float(p),
                    TIE_ULPS * torch.finfo(torch.float32).eps, float(TIE_TERMS), HAS_SHIFT=shift is not None, **meta)
        run(None)
        # rows whose scores all underflow softplus: rerun with their shifts (blocked.flagged_rows)
        shift = _underflow_shifts(qs, k, stats, lo, hi, n, mask4, variant)
        if shift is not None:
            run(shift)
        ctx.shift = shift
        ctx.save_for_backward(q_in, k_in, v_in, out, stats, lo, hi, alpha,
                              *([mask4] if mask4 is not None else []))
        ctx.meta, ctx.interpret, ctx.p, ctx.has_mask = meta, interpret, float(p), mask4 is not None
        ctx.floor = float(floor)
        ctx.v_dtype, ctx.bwd_prec = v.dtype, {"V_PREC": v_prec, "G_PREC": g_prec}
        return out

    @staticmethod
    def backward(ctx, dout):
        q_in, k_in, v_in, out, stats, lo, hi, alpha, *rest = ctx.saved_tensors
        mask4 = rest[0] if ctx.has_mask else None
        meta = {k: x for k, x in ctx.meta.items() if k != "O_PREC"} | ctx.bwd_prec
        mod = kernels(ctx.interpret)
        b, hq, lq, d = q_in.shape
        hkv, lk, dv = k_in.shape[1], k_in.shape[2], v_in.shape[-1]
        dout = dout.contiguous()
        delta = (dout.float() * out).sum(-1).contiguous()  # D_i = <dout_i, out_i>
        do_in = dout.to(v_in.dtype)
        dq = torch.empty(b, hq, lq, d, device=q_in.device, dtype=torch.float32)
        dk = torch.empty(b, hkv, lk, d, device=q_in.device, dtype=torch.float32)
        dv_ = torch.empty(b, hkv, lk, dv, device=q_in.device, dtype=torch.float32)
        gamma = torch.zeros(b * hq, lq, device=q_in.device, dtype=torch.float32)
        margs = _mask_args(mask4, lo)
        strides = (*q_in.stride()[:3], *k_in.stride()[:3], *v_in.stride()[:3], *do_in.stride()[:3])
        tail = (*_row_strides(lo), *margs[1:], lq, lk, hq, hq // hkv, ctx.p, ctx.floor)
        shift = alpha if ctx.shift is None else ctx.shift
        meta["HAS_SHIFT"] = ctx.shift is not None
        _launch("bwd_dq", mod._bwd_dq_kernel, (triton_cdiv(lq, meta["BM"]), b * hq),
                q_in, k_in, v_in, do_in, dq, gamma, lo, hi, alpha, stats, delta, margs[0], shift, *strides, *tail,
                **meta)
        _launch("bwd_dkdv", mod._bwd_dkdv_kernel, (triton_cdiv(lk, meta["BN"]), b * hkv),
                q_in, k_in, v_in, do_in, dk, dv_, gamma, lo, hi, alpha, stats, delta, margs[0], shift,
                *strides, *tail, **meta)
        return dq, dk, dv_.to(ctx.v_dtype), None, None, None, None, None, None, None, None, None


def _underflow_shifts(qs, k, stats, lo, hi, n, mask4, variant):
    """(B*Hq, Lq) shifts of the rows the first forward pass found underflowing, or None (the usual case)."""
    b, hq, lq, _ = qs.shape
    hkv, lk = k.shape[1], k.shape[2]
    stats5 = stats.view(stats.shape[0], b, hkv, hq // hkv, lq)
    flagged = blocked.flagged_rows(stats5, n, variant)
    if not bool(flagged.any()):
        return None
    in_mask = blocked.mask_visibility(mask4, lq, lk) if mask4 is not None else None

    def visibility(bi, heads, qr):  # inside the row's span [lo, hi), and the mask where one is given
        rows = (bi if lo.shape[0] > 1 else 0, heads if lo.shape[1] > 1 else torch.zeros_like(heads), qr)
        j = torch.arange(lk, device=qr.device)[None, :]
        vis = (j >= lo[rows][:, None]) & (j < hi[rows][:, None])
        return vis if in_mask is None else vis & in_mask(bi, heads, qr)
    shift = blocked.underflow_shifts(qs.float(), k.float(), flagged, visibility)
    return None if shift is None else shift.view(b * hq, lq).contiguous()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---- entry point ----

def triton_attention(query, key, value, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P,
                     temperature=None, window: int | None = None, doc_ids=None, cu_seqlens=None,
                     precision: tuple[str, str, str, str] | None = None) -> torch.Tensor:
    """LSSA/LSSAR output (B, Hq, Lq, Dv) in the input dtype, through the Triton kernels.

    ``mask``: bool broadcastable to (B, Hq, Lq, Lk) (True = visible), or None: causal with queries
    aligned to the last keys, restricted to the last ``window`` keys and, for packed sequences
    (Lq = Lk), to each position's document (``doc_ids`` (B, L) or ``cu_seqlens``) — no mask is
    materialised for those. ``precision``: override ``PRECISION[dtype]``, the operand precisions."""
    reason = unusable_reason(query)
    if reason:
        raise RuntimeError(f"backend='triton' cannot run: {reason}.")
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if mask is not None and (window is not None or doc_ids is not None or cu_seqlens is not None):
        raise ValueError("Pass either a mask or window/doc_ids/cu_seqlens, not both.")
    if cu_seqlens is not None:
        doc_ids = cu_seqlens_to_doc_ids(cu_seqlens.to(query.device))
    mask4 = None
    if mask is not None:
        lo, hi, n, mask4 = mask_layout(mask.to(query.device), b, hq, lq, lk)
    elif doc_ids is not None:
        if lq != lk or doc_ids.shape[-1] != lk:
            raise ValueError(f"doc_ids need Lq = Lk = len(doc_ids), got Lq={lq}, Lk={lk}, {tuple(doc_ids.shape)}.")
        lo, hi = doc_spans(doc_ids.to(query.device), window)
        lo, hi = lo[:, None], hi[:, None]
    else:
        lo, hi = causal_spans(lq, lk, window, query.device)
        lo, hi = lo.view(1, 1, lq), hi.view(1, 1, lq)
    if mask4 is None:
        n = (hi - lo).clamp_min(0)
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    nf = n.float()
    alpha = torch.where(n > 3, 1.0 / nf.clamp_min(1), 0.0).contiguous()  # [N > 3] / N
    qs, k = scaled_unit_qk(query, key, n, temperature)  # c_i folded into the query
    if precision is None:
        precision = PRECISION[query.dtype]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (qs, k, value)):
            precision = (precision[0], TRAIN_OUT, *precision[2:])
    out = TritonLSSA.apply(qs, k, value, lo, hi, n, alpha, mask4, variant, float(p), precision,
                           grad_floor(float(p), query.dtype))
    return out.to(query.dtype)
