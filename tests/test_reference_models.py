"""Patched models against the float64 reference, with masks built here from first principles."""

import pytest
import torch
from transformers import AttentionInterface

import lssa_hf
from reference import reference_attention
from tiny_models import tiny_model

REF = "lssa_test_reference"


def expected_mask(pad_mask, window=None):
    """(B, 1, L, L): causal, minus padded keys, minus keys outside the sliding window."""
    length = pad_mask.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (i - j < window)
    return (visible[None] & pad_mask.bool()[:, None, :])[:, None]


def reference_model_logits(model, ids, pad_mask, position_ids, variant, p):
    def attention(module, query, key, value, attention_mask, **kwargs):
        window = kwargs.get("sliding_window")
        out = reference_attention(query, key, value, expected_mask(pad_mask, window), variant=variant, p=p)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(REF, attention)
    original = model.config._attn_implementation
    model.set_attn_implementation(REF)  # no mask function registered: the model passes no mask
    try:
        return model(ids, attention_mask=pad_mask, position_ids=position_ids).logits
    finally:
        model.set_attn_implementation(original)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("variant,p", [("lssa", 15.0), ("lssar", 15.0), ("lssar", 3.0)])
def test_patched_model_equals_reference_under_left_padding(arch, variant, p):
    model = tiny_model(arch).double()
    lssa_hf.patch(model, variant=variant, p=p)
    ids = torch.randint(3, 90, (3, 13), generator=torch.Generator().manual_seed(0))
    pad_mask = torch.ones_like(ids)
    pad_mask[1, :4] = 0
    pad_mask[2, :9] = 0
    position_ids = (pad_mask.cumsum(-1) - 1).clamp_min(0)
    got = model(ids, attention_mask=pad_mask, position_ids=position_ids).logits
    want = reference_model_logits(model, ids, pad_mask, position_ids, variant, p)
    keep = pad_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-9, atol=1e-9)
