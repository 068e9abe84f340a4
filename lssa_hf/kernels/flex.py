"""LSSA / LSSAR through ``torch.nn.attention.flex_attention`` (one fused kernel per pass).

LSSA is a softmax over log(softplus(s)), so it is flex attention with
``score_mod = log(softplus(score))`` and the length scale c_i = log(d) log(N_i) folded into the unit
query (``scale=1``). LSSAR is a second pass with ``score_mod = p log(sp - mu_i)`` (-inf where
sp <= mu_i), mu_i = exp(lse_i) / N_i from pass 1 (0 when N_i <= 3); rows without re-weighted mass
(max_j sp_ij <= mu_i (1 + tol_i), from pass 1's max score; tol = ``functional.tie_tolerance``)
take the pass-1 output. Softplus is written as relu(x) + log1p(exp(-|x|)) because F.softplus inside
a CPU flex kernel gives wrong bf16 results; the kernel runs in float32 (float64 for float64 inputs).

Where it is valid (``supports``):
* CUDA: LSSA forward and backward; LSSAR forward only (mu depends on every score and flex does
  not differentiate through a captured mu): LSSAR training goes to the blocked kernel.
* CPU: compiled flex runs for inference only on this torch (no backward, no logsumexp output, and a
  tensor-indexing mask_mod fails to build), so only causal LSSA inference; it was also measured slower than the blocked kernel on CPU, so ``auto`` never picks it there.
Compilation is shape-dynamic and the number of distinct compiled configurations is bounded: past
torch's recompile limit flex silently falls back to a path that materialises L x L scores, so
``supports`` returns False before that happens and the caller uses the blocked kernel.
"""

from __future__ import annotations

import math

import torch

from ..functional import SHIFT_BELOW, as_4d, scaled_unit_qk, tie_tolerance, underflow_shift, visible_counts
from ..settings import DEFAULT_P

try:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError:  # older torch: the backend is simply unavailable
    flex_attention = None

MAX_CONFIGS = 6  # below torch._dynamo's default recompile limit (8)
_configs: set = set()
_compiled = None


def available() -> bool:
    return flex_attention is not None and hasattr(torch, "compile")


def _config_key(query, key, mask, variant, p, grad):
    return (query.device.type, query.dtype, variant, float(p), mask is None,
            None if mask is None else tuple(s == 1 for s in mask.shape), grad,
            query.shape[1] // key.shape[1])


def supports(query, key, mask, *, variant: str, p: float, grad: bool) -> bool:
    """True when flex can run this call exactly and without hitting the recompile limit."""
    if not available():
        return False
    if query.device.type == "cuda":
        ok = not (grad and variant == "lssar")
    else:  # CPU flex: inference only, no logsumexp output (LSSAR needs it for mu), and a tensor
        # mask_mod with dynamic shapes fails to build in C++ on this torch: causal LSSA only
        ok = query.device.type == "cpu" and not grad and variant == "lssa" and mask is None
    if not ok:
        return False
    cfg = _config_key(query, key, mask, variant, p, grad)
    return cfg in _configs or len(_configs) < MAX_CONFIGS


def _flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def _log_softplus(x):
    """log softplus(x); x itself below SHIFT_BELOW, where softplus(x) = e^x to rounding and would
    underflow (flex's own softmax then subtracts the row max: functional.underflow_shift for free)."""
    sp_log = torch.log(torch.relu(x) + torch.log1p(torch.exp(-x.abs())))
    # a literal: a module-level float is traced as an unbacked SymFloat, which CPU flex cannot lower
    return torch.where(x < -40.0, x, sp_log)


assert SHIFT_BELOW == -40.0, "keep _log_softplus's literal equal to functional.SHIFT_BELOW"


def _block_mask(mask, b, hq, lq, lk, device):
    if mask is None:
        offset = lk - lq

        def mask_mod(bi, hi, qi, ki):
            return ki <= qi + offset
        bsz, heads = None, None
    else:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        m = mask.expand(mask.shape[0], mask.shape[1], lq, lk)
        per_b, per_h = m.shape[0] > 1, m.shape[1] > 1

        def mask_mod(bi, hi, qi, ki):
            return m[bi if per_b else 0, hi if per_h else 0, qi, ki]
        bsz, heads = (b if per_b else None), (hq if per_h else None)
    return create_block_mask(mask_mod, bsz, heads, lq, lk, device=device, _compile=device.type == "cuda")


def flex_lssa(query, key, value, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P,
              temperature=None) -> torch.Tensor:
    """LSSA/LSSAR output (B, Hq, Lq, Dv) in the input dtype, where ``supports`` says flex is exact."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, temperature)
                                           if t is not None)
    if not supports(query, key, mask, variant=variant, p=p, grad=grad):
        raise NotImplementedError("flex LSSA cannot run this call exactly here (see lssa_hf.kernels.flex); "
                                  "use backend='blocked'.")
    return run(query, key, value, mask, variant=variant, p=p, temperature=temperature, grad=grad)


def run(query, key, value, mask, *, variant: str, p: float, temperature, grad: bool) -> torch.Tensor:
    """``flex_lssa`` once ``supports`` has said yes (``lssa_attention`` asks it once per call)."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    _configs.add(_config_key(query, key, mask, variant, p, grad))
    mask4 = None if mask is None else as_4d(mask, lq, lk)
    n = visible_counts(mask4, lq, lk, query.device)
    # the length scale (and tau) folded into the query: flex runs with scale=1
    qs, k = scaled_unit_qk(query, key, n, temperature)
    n = n.expand(b, hq, lq).to(qs.dtype)
    dtype, v = qs.dtype, value.to(qs.dtype)
    block_mask = _block_mask(mask, b, hq, lq, lk, query.device)

    def lssa_mod(score, bi, hi, qi, ki):
        return _log_softplus(score)

    flex = _flex()
    if variant == "lssa":
        out = flex(qs, k, v, score_mod=lssa_mod, block_mask=block_mask, scale=1.0, enable_gqa=hq != hkv)
    else:
        out, aux = flex(qs, k, v, score_mod=lssa_mod, block_mask=block_mask, scale=1.0,
                        enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True, max_scores=True))
        with torch.no_grad():
            # rows whose scores underflow softplus work in units of e^shift (functional.underflow_shift)
            shift = underflow_shift(aux.max_scores.to(dtype)).contiguous()
            mu = torch.where(n > 3, torch.exp(aux.lse.to(dtype) - shift) / n.clamp_min(1), 0.0).contiguous()
            # max_scores is max_j log(sp_j): a row has mass only above the tie threshold
            tied = torch.exp(aux.max_scores.to(dtype) - shift) <= mu * (1.0 + tie_tolerance(n, dtype))
        power = float(p)

        def lssar_mod(score, bi, hi, qi, ki):
            r = shift[bi, hi, qi]
            sp = torch.relu(score) + torch.log1p(torch.exp(-score.abs()))
            x = torch.where(r < 0, torch.exp(_log_softplus(score) - r), sp) - mu[bi, hi, qi]
            return torch.where(x > 0, power * torch.log(torch.where(x > 0, x, 1.0)), -math.inf)

        out2, aux2 = flex(qs, k, v, score_mod=lssar_mod, block_mask=block_mask, scale=1.0,
                          enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True))
        has_mass = (torch.isfinite(aux2.lse) & ~tied).unsqueeze(-1)
        out = torch.where(has_mass, out2, out)
    # fully masked rows: exact zeros whatever the kernel left there
    out = torch.where((n > 0).unsqueeze(-1), out, 0.0)
    return out.to(query.dtype)
