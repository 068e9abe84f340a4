"""LSSA / LSSAR as transformers attention backends ("lssa", "lssar").

Mirrors transformers' ``integrations/sdpa_attention.py``: one function with the AttentionInterface
signature per backend, plus a mask function for AttentionMaskInterface that always materialises a
boolean mask, because N_i (the number of visible keys) must be read from the mask in force.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import lssa_attention
from ..functional import causal_mask
from ..settings import PATCHED, SSMAX, LSSAConfig
from ..ssmax import ssmax_attention
from ..temperature import module_temperature

# Arguments that cannot be honoured: the error names the fix instead of silently changing the model.
_REFUSED = {
    "s_aux": "attention sinks add a learned logit to the softmax denominator, which LSSA does not have",
    "position_bias": "additive position biases (T5-style) have no place in softplus-of-cosine scores",
}


def lssa_mask(*args, **kwargs) -> torch.Tensor | None:
    """sdpa's boolean mask (B, 1, Lq, Lk), True = visible, materialised in every case but one.

    The stock sdpa mask is None whenever sdpa's ``is_causal`` would do, including decoding steps
    and static-cache prefill, where LSSA could not tell N_i. Here None is only returned for a
    plain causal mask over exactly the query tokens (Lq == Lk, no padding, packing or window):
    the backend rebuilds that one exactly and the kernels skip its upper triangle.
    """
    q_len = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_len = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    kwargs["allow_is_causal_skip"] = bool(kwargs.get("allow_is_causal_skip", False)) and q_len == kv_len
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def visibility_mask(module, query, key, attention_mask, is_causal=None, **kwargs) -> torch.Tensor | None:
    """The boolean visibility mask in force for this call (None = plain causal, cheapest)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if attention_mask is not None:
        mask = _as_bool(attention_mask)[..., :k_len]
        if mask.shape[-1] != k_len:
            raise ValueError(f"attention mask covers {mask.shape[-1]} keys but there are {k_len}.")
    else:
        mask = None
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = kwargs.get("sliding_window")
        if not causal:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        elif window is not None and window < k_len:
            mask = causal_mask(q_len, k_len, query.device, window)
    docs = _document_mask(q_len, k_len, **kwargs)
    if docs is not None:
        mask = docs & (causal_mask(q_len, k_len, query.device) if mask is None else mask)
    return mask


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention mask must be boolean (True = visible) or additive float (0 = visible), got "
                        f"{mask.dtype}: pass mask.bool() for a 0/1 mask.")
    visible = mask == 0
    if ((~visible) & (mask > -1e3)).any():
        raise ValueError(
            "LSSA takes a binary mask: an additive float mask may only hold 0 (visible) and large negative "
            "values (hidden). Soft biases cannot be applied to softplus scores; pass a boolean mask instead."
        )
    return visible


def _document_mask(q_len, k_len, cu_seq_lens_q=None, cu_seq_lens_k=None, position_ids=None, **_):
    """Block-diagonal mask of packed documents, or None when nothing is packed.

    Documents come from flash-attention style cumulative lengths, or from ``position_ids`` that
    restart (go down or repeat) without a KV cache: transformers only detects packing when no cache
    object exists, so eval-mode forwards (which create one) would otherwise mix documents.
    """
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        doc_q = torch.bucketize(torch.arange(q_len, device=cu_seq_lens_q.device), cu_seq_lens_q[1:], right=True)
        doc_k = torch.bucketize(torch.arange(k_len, device=cu_seq_lens_k.device), cu_seq_lens_k[1:], right=True)
        return (doc_q[:, None] == doc_k[None, :])[None, None]
    if position_ids is None or q_len != k_len or q_len < 2 or position_ids.shape[-1] != q_len:
        return None
    restarts = position_ids.diff(dim=-1) <= 0
    # torch.compile cannot branch on data: it always builds the (then all-true) document mask
    if not torch.compiler.is_compiling() and not restarts.any():
        return None
    doc = torch.nn.functional.pad(restarts.long().cumsum(-1), (1, 0))  # (B or 1, L)
    return (doc[:, :, None] == doc[:, None, :])[:, None]


def _refuse_unsupported(module, kwargs) -> None:
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} passes `{name}`: {why}. "
                                      "This model cannot use LSSA; keep it on softmax attention.")
    if type(kwargs.get("cache")).__name__ == "PagedAttentionCache":
        raise NotImplementedError("LSSA does not support continuous batching (paged KV cache); use generate().")


def _attention_forward(variant, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       is_causal=None, **kwargs):
    _refuse_unsupported(module, kwargs)
    # `scaling` and `softcap` are ignored on purpose: LSSA's temperature is log(d)*log(N_i) on cosine
    # similarities, which are bounded, so neither 1/sqrt(d) nor logit soft-capping applies.
    settings = LSSAConfig.of(getattr(module, "config", None)) or _DEFAULTS[variant]  # parsed once per value
    mask = visibility_mask(module, query, key, attention_mask, is_causal, **kwargs)
    if getattr(module, "layer_idx", None) in settings.softmax_layers:
        return _softmax_layer(module, query, key, value, mask, dropout, scaling, **kwargs)
    out, weights = lssa_attention(
        query, key, value, mask, variant=variant, p=settings.p, dropout_p=dropout,
        return_weights=bool(kwargs.get("output_attentions")), backend=settings.backend,
        temperature=module_temperature(module, settings.head_temperature),
    )
    out = out.transpose(1, 2).contiguous()
    return _with_softmax_heads(settings, module, out, weights, query, key, value, mask, dropout, scaling, **kwargs)


def _with_softmax_heads(settings, module, out, weights, query, key, value, mask, dropout, scaling, **kwargs):
    """``out`` (B, L, H, D) with the heads in ``softmax_heads`` for this layer taken from SDPA on the
    same mask. SDPA runs on every head (GQA keeps its grouping) and the LSSA output of those heads is
    dropped: simple, and cheap next to LSSA itself."""
    heads = settings.heads_on_softmax(getattr(module, "layer_idx", None))
    if not heads:
        return out, weights
    softmax, _ = _softmax_layer(module, query, key, value, mask, dropout, scaling, **kwargs)
    chosen = torch.zeros(out.shape[2], 1, dtype=torch.bool, device=out.device)
    chosen[list(heads)] = True
    # attention weights: SDPA returns none, so a mixed layer's cannot be given for every head
    return torch.where(chosen, softmax.to(out.dtype), out), None


def _softmax_layer(module, query, key, value, mask, dropout, scaling, **kwargs):
    """A layer kept on softmax (``softmax_layers``): transformers' SDPA backend on the same mask."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


_DEFAULTS = {variant: LSSAConfig(variant=variant) for variant in PATCHED}  # models loaded without settings


def lssa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface backend "lssa": softplus attention with length scaling."""
    return _attention_forward("lssa", module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def lssar_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface backend "lssar": LSSA with re-weighting (power ``config.lssa["p"]``)."""
    return _attention_forward("lssar", module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def ssmax_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """AttentionInterface backend "ssmax": softmax with the query scaled by tau_h log(N_i) / log(length)."""
    _refuse_unsupported(module, kwargs)
    settings = LSSAConfig.of(getattr(module, "config", None)) or _DEFAULTS[SSMAX]
    mask = visibility_mask(module, query, key, attention_mask, is_causal, **kwargs)
    if getattr(module, "layer_idx", None) in settings.softmax_layers:
        return _softmax_layer(module, query, key, value, mask, dropout, scaling, **kwargs)
    out, weights = ssmax_attention(query, key, value, mask, scaling=scaling, length=settings.ssmax_length,
                                   temperature=module_temperature(module, settings.head_temperature),
                                   dropout_p=dropout,
                                   return_weights=bool(kwargs.get("output_attentions")))
    out = out.transpose(1, 2).contiguous()
    return _with_softmax_heads(settings, module, out, weights, query, key, value, mask, dropout, scaling, **kwargs)


def register() -> None:
    """Register the backends and their mask function globally (idempotent)."""
    for name, fn in (("lssa", lssa_attention_forward), ("lssar", lssar_attention_forward),
                     (SSMAX, ssmax_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, lssa_mask)


register()  # importing this module (which imports transformers) makes the backends available
