"""softmax_layers: a hybrid model that keeps softmax attention in chosen layers."""

import pytest
import torch

import lssa_hf
from tiny_models import tiny_model


def ids(batch=2, length=30):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(0))


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
    out = loaded(x[:, :8], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(8, 12):
        out = loaded(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


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
