"""Independent float64 reference of LSSA / LSSAR, written straight from the formulas.

No log-space tricks, no shared code with lssa_hf: loops over heads, direct powers.
"""

import math

import torch


def reference_attention(q, k, v, mask=None, variant="lssa", p=15.0, eps=1e-6, temperature=None):
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); mask bool broadcastable to (B, Hq, Lq, Lk) or None
    (causal, queries aligned to the last keys); temperature: None or Hq multipliers of head h's
    scores. Returns float64 output (B, Hq, Lq, Dv)."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if mask is None:
        i = torch.arange(lq)[:, None] + (lk - lq)
        mask = torch.arange(lk)[None, :] <= i
    mask = mask.to(q.device).expand(b, hq, lq, lk)
    group = hq // hkv
    outs = []
    for h in range(hq):
        qh = q[:, h]
        kh = k[:, h // group]
        vh = v[:, h // group]
        qn = qh / torch.sqrt((qh * qh).sum(-1, keepdim=True) + eps * eps)
        kn = kh / torch.sqrt((kh * kh).sum(-1, keepdim=True) + eps * eps)
        m = mask[:, h]
        n = m.sum(-1, keepdim=True).double()  # N_i
        s = math.log(d) * torch.log(n.clamp(min=1)) * (qn @ kn.transpose(-1, -2))
        if temperature is not None:
            s = temperature[h].double() * s
        sp = torch.log1p(torch.exp(s)) * m  # softplus, zero where not visible
        a = sp / sp.sum(-1, keepdim=True).clamp(min=1e-300)
        if variant == "lssar":
            o = (n > 3).double()
            r = torch.relu(n * a - o) ** p * m
            rs = r.sum(-1, keepdim=True)
            a = torch.where(rs > 0, r / rs.clamp(min=1e-300), a)
        outs.append(a @ vh)
    return torch.stack(outs, dim=1)
