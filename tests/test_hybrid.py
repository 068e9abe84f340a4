"""softmax_layers: a hybrid model that keeps softmax attention in chosen layers."""

import pytest
import torch

import lssa_hf
from tiny_models import tiny_model


def ids(batch=2, length=30):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(0))


def decoded(model, x, prefill):
    """Logits of ``x`` from a prefill of ``prefill`` tokens, then one cached decoding step per token."""
    out = model(x[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(prefill, x.shape[1]):
        out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@torch.no_grad()
def test_softmax_in_every_layer_equals_the_original_and_one_layer_changes_it(arch):
    model = tiny_model(arch)
    x = ids()
    original = model(x).logits
    lssa_hf.patch(model, variant="lssar", p=5.0, softmax_layers=[0, 1])
    assert torch.equal(model(x).logits, original)  # windows and GQA through the same SDPA path
    hybrid = lssa_hf.patch(model, variant="lssar", p=5.0, softmax_layers=[1])(x).logits
    full = lssa_hf.patch(model, variant="lssar", p=5.0, softmax_layers=[])(x).logits
    assert not torch.allclose(hybrid, original) and not torch.allclose(hybrid, full)


@torch.no_grad()
def test_hybrid_survives_save_and_load_and_cached_decoding(tmp_path):
    model = lssa_hf.patch(tiny_model("llama"), variant="lssa", softmax_layers=[0])
    x = ids(batch=1, length=12)
    full = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = lssa_hf.from_pretrained(str(tmp_path))
    assert lssa_hf.settings_of(loaded).softmax_layers == (0,)
    torch.testing.assert_close(decoded(loaded, x, prefill=8), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, message", [([5], "not layers of"), ([-1], "integers >= 0"), ("0", "list of layer"),
                                          ([True], "integers >= 0")])
def test_bad_softmax_layers_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        lssa_hf.patch(tiny_model("llama"), variant="lssar", softmax_layers=bad)


def test_update_settings_checks_softmax_layers_and_applies_them():
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar")
    with pytest.raises(ValueError, match="not layers of"):
        lssa_hf.update_settings(model, softmax_layers=[5])
    assert lssa_hf.settings_of(model).softmax_layers == ()  # unchanged after the refusal
    x = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
        lssa_hf.update_settings(model, softmax_layers=[0])
        assert lssa_hf.settings_of(model).softmax_layers == (0,)
        assert not torch.allclose(model(x).logits, before)


# softmax_heads: query heads kept on softmax inside otherwise LSSA layers

def reference_softmax(q, k, v, mask, scaling):
    """Plain float64 softmax attention, GQA by repeating k/v, written here from the formula."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return weights.nan_to_num(0.0) @ v  # a padded query sees no key: zero, not NaN, as LSSA gives


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_softmax_heads_equal_the_reference_head_by_head_under_left_padding(arch):
    from test_reference_models import expected_mask
    from transformers import AttentionInterface

    from reference import reference_attention

    model = tiny_model(arch).double()
    heads = {0: [1, 2]}  # one head of each KV group in layer 0; layer 1 all LSSAR
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(0))
    pad_mask = torch.ones_like(ids)
    pad_mask[1, :5] = 0
    position_ids = (pad_mask.cumsum(-1) - 1).clamp_min(0)

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        mask = expected_mask(pad_mask, kwargs.get("sliding_window"))
        out = reference_attention(query, key, value, mask, variant="lssar", p=5.0)
        for h in heads.get(module.layer_idx, []):
            out[:, h] = reference_softmax(query, key, value, mask, scaling)[:, h]
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("lssa_test_heads", attention)
    model.set_attn_implementation("lssa_test_heads")
    want = model(ids, attention_mask=pad_mask, position_ids=position_ids).logits
    model.set_attn_implementation("sdpa")
    lssa_hf.patch(model, variant="lssar", p=5.0, softmax_heads=heads)
    got = model(ids, attention_mask=pad_mask, position_ids=position_ids).logits
    keep = pad_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-9, atol=1e-9)
    full = lssa_hf.patch(model, variant="lssar", p=5.0, softmax_heads={})(ids, attention_mask=pad_mask,
                                                                          position_ids=position_ids).logits
    assert not torch.allclose(full[keep], want[keep])  # the heads matter


@torch.no_grad()
@pytest.mark.parametrize("variant", ["lssa", "lssar", "ssmax"])
def test_every_head_on_softmax_equals_the_softmax_layer(variant):
    model = tiny_model("qwen2")  # a sliding-window layer and a full one
    x = ids()
    layer = lssa_hf.patch(model, variant=variant, softmax_layers=[1])(x).logits
    every_head = lssa_hf.patch(model, variant=variant, softmax_layers=[], softmax_heads={1: [0, 1, 2, 3]})(x).logits
    torch.testing.assert_close(every_head, layer, rtol=1e-5, atol=1e-6)


def test_softmax_heads_survive_save_and_load_and_cached_decoding_and_get_gradients(tmp_path):
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar", p=5.0, softmax_heads={1: [3], 0: [0]})
    x = ids(batch=1, length=12)
    model.zero_grad()
    model(x, labels=x).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        full = model(x).logits
        model.save_pretrained(tmp_path)
        loaded = lssa_hf.from_pretrained(str(tmp_path))
        assert lssa_hf.settings_of(loaded).softmax_heads == ((0, (0,)), (1, (3,)))
        got = decoded(loaded, x, prefill=8)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({5: [0]}, "not layers of"), ({0: [4]}, "has 4 query heads"), ({0: 1}, "lists of query-head indices"),
    ({0: [-1]}, "lists of query-head indices"), ([0, 1], "lists of query-head indices"),
])
def test_bad_softmax_heads_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        lssa_hf.patch(tiny_model("llama"), variant="lssar", softmax_heads=bad)


def test_softmax_heads_of_a_softmax_layer_are_refused_as_ambiguous():
    with pytest.raises(ValueError, match="drop it from softmax_heads or from softmax_layers"):
        lssa_hf.patch(tiny_model("llama"), variant="lssar", softmax_layers=[0], softmax_heads={0: [1]})
