"""The scaled-softmax baseline ("ssmax") against a float64 reference of its formula, through the
kernel function and through models: padding, sliding windows, GQA, cached decoding, temperature."""

import math

import pytest
import torch

import lssa_hf
from lssa_hf.functional import causal_mask
from lssa_hf.ssmax import ssmax_attention
from tiny_models import tiny_model


def reference(q, k, v, mask, scaling, length, tau=None):
    """softmax_j(tau_h log(N_i) / log(length) * scaling * <q_i, k_j>) over visible j, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    n = mask.sum(-1, keepdim=True).double()
    factor = torch.log(n.clamp_min(1)) / math.log(length)
    if tau is not None:
        factor = factor * tau.double().view(1, -1, 1, 1)
    scores = (q @ k.transpose(-1, -2)) * scaling * factor
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), -1)
    return torch.where(n > 0, weights, 0.0) @ v


def inputs(b=2, hq=4, hkv=2, lq=7, lk=9, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk))]


def masks(lq=7, lk=9):
    causal = causal_mask(lq, lk).expand(2, 1, lq, lk)
    padded = causal.clone()
    padded[0, :, :, :3] = False  # left padding of row 0
    padded[1, :, 2] = False  # a fully masked query row
    return {"none": None, "causal": causal, "padded": padded, "window": causal_mask(lq, lk, window=3)}


@pytest.mark.parametrize("mask_name", ["none", "causal", "padded", "window"])
@pytest.mark.parametrize("weights", [False, True])
def test_ssmax_equals_the_float64_reference(mask_name, weights):
    q, k, v = inputs()
    mask = masks()[mask_name]
    tau = torch.tensor([0.5, 1.0, 1.5, 2.0])
    out, w = ssmax_attention(q, k, v, mask, scaling=0.3, length=16, temperature=tau, return_weights=weights)
    full = causal_mask(7, 9) if mask is None else mask
    torch.testing.assert_close(out.double(), reference(q, k, v, full, 0.3, 16, tau), rtol=1e-5, atol=1e-6)
    assert (w is not None) == weights


def test_ssmax_gradients_match_the_reference():
    q, k, v = (t.double().requires_grad_() for t in inputs())
    tau = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    mask = masks()["padded"]
    out, _ = ssmax_attention(q, k, v, mask, scaling=0.3, length=16, temperature=tau)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, tau))
    expected = torch.autograd.grad(reference(q, k, v, mask, 0.3, 16, tau).square().sum(), (q, k, v, tau))
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_ssmax_equals_softmax_where_a_query_sees_length_keys():
    q, k, v = inputs(lq=16, lk=16)
    out, _ = ssmax_attention(q, k, v, None, scaling=0.3, length=16)
    softmax = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               is_causal=True, scale=0.3)
    torch.testing.assert_close(out[:, :, -1], softmax[:, :, -1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, 4], softmax[:, :, 4], atol=1e-3)  # fewer keys: flatter


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.no_grad()
def test_ssmax_models_decode_and_pad_like_full_forwards(arch):
    model = lssa_hf.patch(tiny_model(arch), variant="ssmax", ssmax_length=8)
    x = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    full = model(x).logits
    out = model(x[:, :8], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for i in range(8, 12):
        out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    attention_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=attention_mask).logits[:, 3:], full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_ssmax_patch_keeps_settings_trains_temperature_and_unpatches(tmp_path):
    model = tiny_model("llama", num_hidden_layers=1)  # one layer: the last query's inputs are unchanged
    x = torch.randint(3, 90, (1, 20))
    before = model(x).logits
    lssa_hf.patch(model, variant="ssmax", ssmax_length=20, head_temperature=True)
    settings = lssa_hf.settings_of(model)
    assert settings.variant == "ssmax" and settings.ssmax_length == 20
    changed = model(x).logits
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed[:, -1], before[:, -1], rtol=1e-4, atol=1e-5)  # N = 20 at the last query
    model.save_pretrained(tmp_path)
    loaded = lssa_hf.from_pretrained(str(tmp_path))
    assert lssa_hf.settings_of(loaded) == settings
    assert torch.equal(loaded(x).logits, changed)
    lssa_hf.unpatch(model)
    assert torch.equal(model(x).logits, before)


def test_bad_ssmax_length_is_refused():
    with pytest.raises(ValueError, match="ssmax_length"):
        lssa_hf.patch(tiny_model("llama"), variant="ssmax", ssmax_length=1)
