"""LSSA / LSSAR attention math, fully materialised. Pure torch: no transformers import.

Shapes follow torch SDPA: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D), Hq % Hkv == 0.
``mask`` is a boolean tensor broadcastable to (B, Hq, Lq, Lk), True where query i may see key j;
``None`` means causal with the queries aligned to the last keys (KV-cache decoding layout).
N_i, the number of visible keys of query i, is always read from the mask actually in force.

The functions here hold the definition of the method; the blocked and fused kernels must agree with
them (tests compare every path with an independent float64 reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .settings import DEFAULT_P, VARIANTS, check_settings  # noqa: F401  (VARIANTS: re-exported)

NORM_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_eps(dtype: torch.dtype) -> float:
    """Normalisation epsilon for inputs of ``dtype``.

    A zero row's gradient is upstream / eps: 1e-6 would overflow float16's range (65504), so float16
    inputs use 1e-3 (below its resolution for any row with norm above ~0.05).
    """
    return 1e-3 if dtype == torch.float16 else NORM_EPS


def inverse_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """1 / sqrt(||x||^2 + eps^2) per row, (..., 1): finite at zero, and no x-sized temporary."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + eps * eps)


def unit(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x / ||x||, smooth at zero: a zero row maps to zero with a finite gradient."""
    return x * inverse_norm(x, eps)


class _SaturatingCast(torch.autograd.Function):
    """x.to(dtype) whose gradient saturates at the input dtype's largest finite value: a zero fp16
    row's gradient (upstream / eps, times LSSAR's re-weighting) can exceed 65504, and inf would
    poison the optimizer step; the direction is kept."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.input_dtype = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        big = torch.finfo(ctx.input_dtype).max
        return grad.clamp(-big, big).to(ctx.input_dtype), None


def to_compute(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the compute dtype; from half precision with a saturating gradient (``_SaturatingCast``)."""
    if x.dtype in (torch.float16, torch.bfloat16) and dtype != x.dtype and x.requires_grad:
        return _SaturatingCast.apply(x, dtype)
    return x.to(dtype)


def causal_mask(q_len: int, k_len: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Lq, Lk) bool: query i sees keys j <= Lk - Lq + i (queries aligned to the last keys),
    and with a sliding ``window`` only the last ``window`` of those (transformers' convention)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def length_scale(visible: torch.Tensor, head_dim: int) -> torch.Tensor:
    """log(d) * log(N_i) from the per-query visible-key counts N_i (0 for fully masked rows)."""
    return math.log(head_dim) * torch.log(visible.clamp_min(1))


def head_factor(temperature, query: torch.Tensor, dtype: torch.dtype):
    """Optional per-query-head multiplier tau_h of the length scale, as a (1, Hq, 1, 1) tensor.

    ``temperature`` None (the paper: tau = 1), or a tensor of Hq positive values; it may require grad.
    """
    if temperature is None:
        return None
    hq = query.shape[1]
    if not torch.is_tensor(temperature) or temperature.numel() != hq:
        got = tuple(temperature.shape) if torch.is_tensor(temperature) else type(temperature).__name__
        raise ValueError(f"temperature must be a tensor with one value per query head ({hq}), got {got}.")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(temperature).all() & (temperature > 0).all()):
        raise ValueError(f"temperature must be finite and > 0 for every head (it multiplies the length scale; "
                         f"1 is the paper), got {temperature.detach().flatten().tolist()}: a learned temperature "
                         "that diverged needs a lower learning rate or its log-parameter reset.")
    return temperature.to(device=query.device, dtype=dtype).reshape(1, hq, 1, 1)


# ---- the prologue every kernel shares: N_i, then unit q/k with c_i = tau_h log(d) log(N_i) folded into q


def as_4d(mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """View a broadcastable bool mask as (Bm, Hm, Lq, Lk) with Bm in {1, B}, Hm in {1, Hq}."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(mask.shape[0], mask.shape[1], q_len, k_len)


def visible_counts(mask4, q_len: int, k_len: int, device) -> torch.Tensor:
    """N_i as a (Bm, Hm, Lq) int tensor from a mask ``as_4d``; None = causal, queries aligned to the
    last keys ((1, 1, Lq))."""
    if mask4 is None:
        return (torch.arange(q_len, device=device) + (k_len - q_len + 1)).clamp(0, k_len).view(1, 1, q_len)
    if mask4.is_contiguous():  # a uint8 view sums faster than bool
        return mask4.view(torch.uint8).sum(-1, dtype=torch.int32)
    return mask4.sum(-1)


def scaled_unit_qk(query, key, counts: torch.Tensor, temperature=None):
    """(c * q^, k^) in the compute dtype, c_i = tau_h log(d) log(N_i) from ``counts`` (Bm, Hm, Lq):
    <c q^_i, k^_j> is the score s_ij, one multiply per row instead of per score. Autograd reaches a
    learned ``temperature`` through the scaled query."""
    dtype = compute_dtype(query.dtype)
    eps = norm_eps(query.dtype)
    q, k = to_compute(query, dtype), to_compute(key, dtype)
    scale = length_scale(counts.to(dtype), query.shape[-1]).unsqueeze(-1)  # (Bm, Hm, Lq, 1)
    tau = head_factor(temperature, query, dtype)
    if tau is not None:
        scale = scale * tau
    # one q-sized product: the per-row factors (1 / ||q||, c) are multiplied first
    return q * (inverse_norm(q, eps) * scale), unit(k, eps)


def softplus_scores(query, key, mask, temperature=None):
    """Softplus scores (zero where masked), N_i and the visibility, as (B, Hq, Lq, Lk), (B, Hq, Lq, 1)
    and (B, Hq, Lq, Lk), in the compute dtype. s_ij = tau_h log(d) log(N_i) <q^_i, k^_j>."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    mask4 = as_4d(mask, lq, lk)
    counts = visible_counts(mask4, lq, lk, query.device)  # counted once, not per head
    qs, k = scaled_unit_qk(query, key, counts, temperature)
    qs = qs.expand(b, hq, lq, d)
    s = (qs.reshape(b, hkv, (hq // hkv) * lq, d) @ k.transpose(-1, -2)).view(b, hq, lq, lk)
    visible = mask4.expand(b, hq, lq, lk)
    sp = F.softplus(s)
    # |s_ij| <= ||c q^_i||: only rows whose scaled query is longer than -SHIFT_BELOW can need a shift
    if torch.compiler.is_compiling() or bool(torch.linalg.vector_norm(qs, dim=-1).amax() > -SHIFT_BELOW):
        shift = underflow_shift(torch.where(visible, s, -math.inf).amax(-1, keepdim=True)).detach()
        # the unselected branches get safe inputs: exp of a large s would be inf, and inf * 0 a NaN gradient
        shifted = torch.exp(torch.where(visible & (shift < 0), s - shift, -math.inf))
        sp = torch.where(shift < 0, shifted, sp)
    sp = torch.where(visible, sp, 0.0)
    return sp, counts.to(s.dtype).unsqueeze(-1).expand(b, hq, lq, 1), visible


# Underflow. |s_ij| <= c_i = tau log(d) log(N_i), so once c_i > 87 a row's visible scores can all lie
# below float32's softplus range (S = 0: no output, NaN gradients). There softplus(s) = e^s to
# relative e^s / 2, so rows whose largest score is below SHIFT_BELOW take weights exp(s - r_i),
# r_i = max_j s_ij: a row constant that cancels in A = sp / S and in LSSAR's renormalisation (the
# output does not depend on it, so backward treats it as a constant). e^-40 / 2 is below float64
# rounding, so the two formulas agree to the last bit where they meet.
SHIFT_BELOW = -40.0
# The strip kernels learn a row needs the shift from their first pass: its largest softplus score is
# below e^-45 (then its largest score is below -44.9, past SHIFT_BELOW); rows above that are exact.
FLAG_BELOW = math.exp(-45.0)


def underflow_shift(row_max: torch.Tensor) -> torch.Tensor:
    """r_i per row from its largest visible score: that score where it is below SHIFT_BELOW, else 0
    (also for rows without visible keys, whose max is -inf)."""
    return torch.where(torch.isfinite(row_max) & (row_max < SHIFT_BELOW), row_max, 0.0)


# Near ties. t_ij = N_i A_ij - 1 (rows with N_i > 3) is a difference of nearly equal numbers: the
# row sum S of N positive terms has relative rounding at most (N - 1) eps in any summation order, and
# each softplus score a few eps more (its cosine, softplus, the exp/log round trip of flex), so
# |error of t_ij| < (N + 16) eps. A row whose largest t_ij is within TIE_ULPS times that of zero
# has no re-weighted mass (its mass is rounding): it takes the LSSA fallback on every backend, so an
# exactly tied row (identical keys, zero query) never becomes a sharp distribution over the keys whose
# rounding happened to be positive. Rows with mass keep the plain formula relu(t)^p for every key (a
# per-key threshold would change the gradient of keys near t = 0 by O(1) for p <= 1). Rows with
# N_i <= 3 have t = N A > 0 (no cancellation) and no threshold.
TIE_ULPS = 2.0
TIE_TERMS = 16


def tie_tolerance(n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per row: the row has re-weighted mass only if max_j t_j exceeds this (0 for rows with N <= 3)."""
    return torch.where(n > 3, TIE_ULPS * (n + TIE_TERMS) * torch.finfo(dtype).eps, 0.0)


# Gradient bound (half-precision inputs). The gradient through the re-weighting is the derivative
# of the log-weight p log t_ij, p / t_ij: it grows without bound as t_ij -> 0 (nearly tied rows, any
# key near the mean for p < 1). Beyond 1 / eps of the input dtype a one-ulp change of an fp16 / bf16
# input moves t_ij by more than t_ij itself (the gradient describes rounding), and fp16 overflows
# (65504). So for fp16 / bf16 inputs, in rows with N > 3, that derivative is capped at 1 / eps_in:
# keys with t_ij < p eps_in get p / (p eps_in) instead of p / t_ij (through sp_ij - mean_i; the row
# constant of t cancels in the renormalisation). Outputs are exact; fp32 / fp64 inputs keep the
# exact gradient.
def grad_floor(p: float, input_dtype: torch.dtype) -> float:
    """t below which the derivative of p log t is capped (0: exact gradient)."""
    return p * torch.finfo(input_dtype).eps if input_dtype in (torch.float16, torch.bfloat16) else 0.0


class _FlooredLog(torch.autograd.Function):
    """log(t) whose backward divides by max(t, floor) instead of t."""

    @staticmethod
    def forward(ctx, t, floor):
        ctx.save_for_backward(t, floor)
        return torch.log(t)

    @staticmethod
    def backward(ctx, grad):
        t, floor = ctx.saved_tensors
        return grad / torch.maximum(t, floor), None


def reweight(sp: torch.Tensor, n: torch.Tensor, visible: torch.Tensor, p: float,
             input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LSSAR weights from softplus scores: relu(N*A - O)^p renormalised, in log space.

    N*A - O = x / m with x = sp - m, m = O * S / N (the row mean, or 0): the row constant 1/m cancels
    in the renormalisation, so the weights are softmax(p log x) over x > 0. Rows whose largest
    N*A - O is at most ``tie_tolerance`` (no mass but rounding) fall back to LSSA weights A. For
    fp16 / bf16 ``input_dtype`` the gradient through the re-weighting is bounded (``grad_floor``).
    """
    total = sp.sum(-1, keepdim=True)
    lssa = sp / total.clamp_min(torch.finfo(sp.dtype).tiny)
    m = torch.where(n > 3, total / n.clamp_min(1), 0.0)
    x = sp - m  # (N*A - O) * m
    keep = visible & (x > 0)
    safe_x = torch.where(keep, x, 1.0)  # log of a safe value: the unselected branch has a finite gradient
    floor = grad_floor(p, input_dtype or sp.dtype)
    if floor and safe_x.requires_grad:  # the derivative of log x capped at 1 / (floor m): t < floor
        log_x = _FlooredLog.apply(safe_x, (floor * m).detach())
    else:
        log_x = torch.log(safe_x)
    logits = torch.where(keep, p * log_x, -math.inf)
    max_x = torch.where(visible, x, 0.0).amax(-1, keepdim=True)
    has_mass = max_x > tie_tolerance(n, sp.dtype) * m
    reweighted = torch.softmax(torch.where(has_mass, logits, 0.0), dim=-1)
    return torch.where(has_mass, reweighted, lssa)


def lssa_weights(query, key, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P, temperature=None):
    """Attention weights (B, Hq, Lq, Lk) in the compute dtype; fully masked rows are zero."""
    check_settings(variant, p)
    check_shapes(query, key, key)
    return _weights(query, key, mask, variant, p, temperature)


def _weights(query, key, mask, variant, p, temperature):
    if mask is None:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    sp, n, visible = softplus_scores(query, key, mask, temperature)
    if variant == "lssar":
        return reweight(sp, n, visible, p, query.dtype)
    return sp / sp.sum(-1, keepdim=True).clamp_min(torch.finfo(sp.dtype).tiny)


def materialized_attention(query, key, value, mask=None, *, variant="lssa", p=DEFAULT_P,
                           dropout_p: float = 0.0, return_weights: bool = False, temperature=None):
    """LSSA/LSSAR with the full weight matrix: the plain, always-correct path.

    Returns (output (B, Hq, Lq, Dv) in the input dtype, weights or None).
    """
    check_settings(variant, p)
    check_shapes(query, key, value)
    return _materialized(query, key, value, mask, variant, p, dropout_p, return_weights, temperature)


def _materialized(query, key, value, mask, variant, p, dropout_p, return_weights, temperature):
    """``materialized_attention`` for checked settings and shapes (``lssa_attention`` checks once)."""
    weights = _weights(query, key, mask, variant, p, temperature)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    b, hq, lq, lk = weights.shape
    hkv = value.shape[1]
    v = value.to(weights.dtype)
    out = (weights.reshape(b, hkv, (hq // hkv) * lq, lk) @ v).view(b, hq, lq, v.shape[-1])
    return out.to(query.dtype), (weights.to(query.dtype) if return_weights else None)


def check_shapes(query, key, value) -> None:
    """Clear errors for layouts that would otherwise broadcast into wrong results."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            got = t.dtype if torch.is_tensor(t) else type(t).__name__
            raise TypeError(f"LSSA {name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                            f"got {got}: convert it with .float().")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("LSSA expects 4-D query/key/value in (batch, heads, length, head_dim) layout.")
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"Mismatched shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}.")
    if query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads "
                         f"({key.shape[1]}) and head dims must match.")


def check_mask(mask, query, key) -> None:
    """A mask must be boolean (True = visible) and broadcastable to (B, Hq, Lq, Lk)."""
    if mask is None:
        return
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise TypeError(f"mask must be a boolean tensor (True = visible), got {got}: pass mask.bool() for a 0/1 "
                        "mask, or mask == 0 for an additive float mask.")
    b, hq, lq, _ = query.shape
    want = (b, hq, lq, key.shape[-2])
    shape = tuple(mask.shape)
    if mask.dim() > 4 or any(m not in (1, w) for m, w in zip(shape[::-1], want[::-1])) or shape[-1:] != want[-1:]:
        raise ValueError(f"mask of shape {shape} does not broadcast to (batch, query heads, queries, keys) = {want}: "
                         "it needs one column per key, and batch/heads/queries of the inputs' size or 1.")
