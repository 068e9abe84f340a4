"""Scaled softmax ("ssmax", Nakanishi 2025): the baseline that isolates LSSA's length scale.

softmax over visible keys of  s_h log(N_i) * scaling * <q_i, k_j>,  with N_i the visible-key count
from the mask in force (as in LSSA) and ``scaling`` the model's own (1/sqrt(d)). With
s_h = tau_h / log(length) the attention equals the checkpoint's softmax for a query that sees
``length`` keys (tau_h = 1: the per-head temperature of ``lssa_hf.temperature``, learnable), flatter
before and sharper after. If ssmax + LoRA extrapolates as well as LSSAR + LoRA, the gain comes from
the length scale, not from softplus and re-weighting. Runs on torch SDPA. Pure torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import functional
from .functional import as_4d, causal_mask, compute_dtype, head_factor
from .settings import DEFAULT_SSMAX_LENGTH as DEFAULT_LENGTH
from .settings import check_length


def visible_counts(mask, lq: int, lk: int, device) -> torch.Tensor:
    """N_i as (B or 1, H or 1, Lq, 1) float32 (``functional.visible_counts``, the kernels' count);
    ``mask`` None: causal, queries aligned to the last keys."""
    mask4 = None if mask is None else as_4d(mask, lq, lk)
    return functional.visible_counts(mask4, lq, lk, device).unsqueeze(-1).float()


def query_factor(n: torch.Tensor, length: int, query: torch.Tensor, temperature=None) -> torch.Tensor:
    """tau_h log(N_i) / log(length), broadcastable to the query (fp32, fp64 for fp64 queries; 0 for
    fully masked rows)."""
    dtype = compute_dtype(query.dtype)
    factor = torch.log(n.to(dtype).clamp_min(1)) / math.log(check_length(length))
    tau = head_factor(temperature, query, dtype)
    return factor if tau is None else factor * tau


def ssmax_attention(query, key, value, mask=None, *, scaling: float | None = None, length: int = DEFAULT_LENGTH,
                    temperature=None, dropout_p: float = 0.0, return_weights: bool = False):
    """Scaled-softmax attention. query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D), ``mask`` bool
    broadcastable to (B, Hq, Lq, Lk) (True = visible) or None (causal, queries aligned to the last
    keys). Returns (output (B, Hq, Lq, Dv) in the input dtype, weights or None); fully masked rows
    give zero output."""
    lq, lk = query.shape[-2], key.shape[-2]
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    n = visible_counts(mask, lq, lk, query.device)
    q = query * query_factor(n, length, query, temperature).to(query.dtype)
    if mask is None and lq != lk:
        mask = causal_mask(lq, lk, query.device)  # SDPA's is_causal aligns to the first keys
    empty = n == 0
    if mask is not None:
        mask = mask | empty  # a fully masked row would be NaN in softmax: computed over all keys, then zeroed
    groups = query.shape[1] // key.shape[1]
    if return_weights:
        k = key.repeat_interleave(groups, 1) if groups > 1 else key
        v = value.repeat_interleave(groups, 1) if groups > 1 else value
        scores = (q @ k.transpose(-1, -2)).float() * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        elif lq > 1:
            scores = scores.masked_fill(~causal_mask(lq, lk, query.device), -math.inf)
        weights = torch.softmax(scores, -1).masked_fill(empty, 0.0)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p, training=True)
        out = (weights.to(v.dtype) @ v)
        return out, weights.to(query.dtype)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=mask is None and lq > 1, scale=scaling, enable_gqa=groups > 1)
    return (out.masked_fill(empty, 0.0) if mask is not None else out), None
