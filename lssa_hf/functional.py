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

VARIANTS = ("lssa", "lssar")
DEFAULT_P = 15.0
NORM_EPS = 1e-6


def check_settings(variant: str, p: float) -> None:
    """Raise a ValueError that names the fix for an unknown variant or a non-positive p."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown LSSA variant {variant!r}: use one of {VARIANTS}.")
    if variant == "lssar" and not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
        raise ValueError(f"LSSAR needs a finite re-weighting power p > 0 (paper default 15.0), got {p!r}.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_eps(dtype: torch.dtype) -> float:
    """Normalisation epsilon for inputs of ``dtype``.

    A zero row's gradient is upstream / eps: 1e-6 would overflow float16's range (65504), so float16
    inputs use 1e-3 (below its resolution for any row with norm above ~0.05).
    """
    return 1e-3 if dtype == torch.float16 else NORM_EPS


def unit(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x / ||x||, smooth at zero: a zero row maps to zero with a finite gradient."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps * eps)


def unit_qk(query: torch.Tensor, key: torch.Tensor, dtype: torch.dtype):
    """Unit-norm query and key in the compute ``dtype``, with the input dtype's epsilon."""
    eps = norm_eps(query.dtype)
    return unit(query.to(dtype), eps), unit(key.to(dtype), eps)


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
    return temperature.to(device=query.device, dtype=dtype).reshape(1, hq, 1, 1)


def softplus_scores(query, key, mask, dtype, temperature=None):
    """Softplus scores (zero where masked) and N_i, both as (B, Hq, Lq, Lk)/(B, Hq, Lq, 1).

    s_ij = tau_h log(d) log(N_i) <q^_i, k^_j>, tau_h = 1 unless a per-head ``temperature`` is given."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    q, k = unit_qk(query, key, dtype)
    cos = (q.reshape(b, hkv, (hq // hkv) * lq, d) @ k.transpose(-1, -2)).view(b, hq, lq, lk)
    visible = mask.expand(b, hq, lq, lk)
    n = mask.sum(-1, keepdim=True).to(dtype).expand(b, hq, lq, 1)  # count once, not per head
    scale = length_scale(n, d)
    tau = head_factor(temperature, query, dtype)
    if tau is not None:
        scale = scale * tau
    sp = torch.where(visible, F.softplus(scale * cos), 0.0)
    return sp, n, visible


def reweight(sp: torch.Tensor, n: torch.Tensor, visible: torch.Tensor, p: float) -> torch.Tensor:
    """LSSAR weights from softplus scores: relu(N*A - O)^p renormalised, in log space.

    Rows whose re-weighted mass is all zero fall back to LSSA weights A.
    """
    total = sp.sum(-1, keepdim=True)
    lssa = sp / total.clamp_min(torch.finfo(sp.dtype).tiny)
    offset = (n > 3).to(sp.dtype)
    t = n * lssa - offset  # N*A - O
    keep = visible & (t > 0)
    # log of a safe value so the unselected branch has a finite gradient
    logits = torch.where(keep, p * torch.log(torch.where(keep, t, 1.0)), -math.inf)
    has_mass = keep.any(-1, keepdim=True)
    reweighted = torch.softmax(torch.where(has_mass, logits, 0.0), dim=-1)
    return torch.where(has_mass, reweighted, lssa)


def lssa_weights(query, key, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P, temperature=None):
    """Attention weights (B, Hq, Lq, Lk) in the compute dtype; fully masked rows are zero."""
    check_settings(variant, p)
    check_shapes(query, key, key)
    dtype = compute_dtype(query.dtype)
    if mask is None:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    sp, n, visible = softplus_scores(query, key, mask, dtype, temperature)
    if variant == "lssar":
        return reweight(sp, n, visible, p)
    return sp / sp.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def materialized_attention(query, key, value, mask=None, *, variant="lssa", p=DEFAULT_P,
                           dropout_p: float = 0.0, return_weights: bool = False, temperature=None):
    """LSSA/LSSAR with the full weight matrix: the plain, always-correct path.

    Returns (output (B, Hq, Lq, Dv) in the input dtype, weights or None).
    """
    weights = lssa_weights(query, key, mask, variant=variant, p=p, temperature=temperature)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    b, hq, lq, lk = weights.shape
    hkv = value.shape[1]
    v = value.to(weights.dtype)
    out = (weights.reshape(b, hkv, (hq // hkv) * lq, lk) @ v).view(b, hq, lq, v.shape[-1])
    return out.to(query.dtype), (weights.to(query.dtype) if return_weights else None)


def check_shapes(query, key, value) -> None:
    """Clear errors for layouts that would otherwise broadcast into wrong results."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("LSSA expects 4-D query/key/value in (batch, heads, length, head_dim) layout.")
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"Mismatched shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}.")
    if query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads "
                         f"({key.shape[1]}) and head dims must match.")
