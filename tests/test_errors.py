"""Bad input gets an error that names the fix (never a raw torch error, a NaN or silent acceptance),
and patch -> re-patch -> unpatch restores the original attention bit for bit."""

import math

import pytest
import torch

import lssa_hf
from lssa_hf import LSSAConfig, lssa_attention
from lssa_hf.integrations.hf_attention import lssa_attention_forward
from tiny_models import VOCAB, tiny_model

BAD_P = ["15", None, True, False, math.nan, math.inf, 0, -1.0, torch.tensor(15.0), [15.0]]


def qkv(dtype=torch.float32, hq=4, hkv=2, lq=6, lk=6, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, hq, lq, d, generator=g).to(dtype), torch.randn(2, hkv, lk, d, generator=g).to(dtype),
            torch.randn(2, hkv, lk, d, generator=g).to(dtype))


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
@pytest.mark.parametrize("p", BAD_P, ids=repr)
def test_bad_p_is_refused_for_either_variant(variant, p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"finite number p > 0, e\.g\. p=15\.0"):
        lssa_attention(q, k, v, variant=variant, p=p)
    with pytest.raises(ValueError, match="finite number p > 0"):
        LSSAConfig(variant=variant, p=p)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="finite number p > 0"):
        lssa_hf.patch(model, variant=variant, p=p)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "lssa")


@pytest.mark.parametrize("variant", [None, "LSSA", "softmax", 3, ""])
def test_bad_variant_is_refused(variant):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"use one of \('lssa', 'lssar'\)"):
        lssa_attention(q, k, v, variant=variant)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature_is_refused(tau):
    q, k, v = qkv()
    temperature = torch.tensor([1.0, tau, 1.0, 1.0])
    for backend in ("materialized", "blocked", "blocked_compiled"):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            lssa_attention(q, k, v, variant="lssar", temperature=temperature, backend=backend)


def test_diverged_learned_temperature_is_refused_in_a_model():
    model = lssa_hf.patch(tiny_model("llama"), head_temperature=True)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "log_temperature" in n)[1] = math.nan
    with pytest.raises(ValueError, match="temperature must be finite"):
        model(torch.randint(3, VOCAB, (1, 5)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32])
def test_non_boolean_masks_are_refused_with_the_conversion(dtype):
    q, k, v = qkv()
    mask = torch.ones(6, 6).tril().to(dtype)
    with pytest.raises(TypeError, match=r"boolean tensor.*mask\.bool\(\)"):
        lssa_attention(q, k, v, mask)
    with pytest.raises(TypeError, match="boolean"):
        lssa_attention(q, k, v, mask.tolist())


@pytest.mark.parametrize("shape", [(6, 5), (6, 7), (5, 6), (3, 4, 6, 6), (2, 3, 6, 6), (1, 2, 1, 6, 6)])
def test_masks_of_the_wrong_shape_are_refused(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"does not broadcast to .* = \(2, 4, 6, 6\)"):
        lssa_attention(q, k, v, torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(6,), (1, 6), (6, 6), (2, 1, 1, 6), (1, 4, 6, 6), (2, 4, 6, 6)])
def test_broadcastable_masks_are_accepted(shape):
    q, k, v = qkv()
    out, _ = lssa_attention(q, k, v, torch.ones(shape, dtype=torch.bool))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_inputs_are_refused(which, dtype):
    tensors = list(qkv())
    tensors[which] = tensors[which].to(dtype)
    name = ("query", "key", "value")[which]
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor.*float()"):
        lssa_attention(*tensors)


def test_integer_hf_masks_are_refused_with_the_conversion():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match=r"mask\.bool\(\)"):
        lssa_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.long))


def ids(n=12, seed=0):
    return torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_patch_repatch_unpatch_restores_the_original_bit_for_bit(arch, impl):
    model = tiny_model(arch)
    model.set_attn_implementation(impl)
    before = model(ids()).logits
    lssa_hf.patch(model, variant="lssa")
    first = model(ids()).logits
    lssa_hf.patch(model, variant="lssar", p=3.0, backend="blocked", head_temperature=True)
    assert lssa_hf.settings_of(model) == LSSAConfig("lssar", 3.0, "blocked", True)
    second = model(ids()).logits
    assert not torch.allclose(first, second) and not torch.allclose(before, first)
    lssa_hf.unpatch(model)
    assert model.config._attn_implementation == impl and not hasattr(model.config, "lssa")
    assert "attn_implementation" not in model.config.to_dict() or model.config.to_dict()["attn_implementation"] != "lssar"
    assert torch.equal(model(ids()).logits, before)
    assert not any("lssa_temperature" in n for n, _ in model.named_parameters())


def test_unpatch_to_an_implementation_this_machine_cannot_load_keeps_lssa():
    """flash_attention_2 cannot load on CPU: unpatch says so, leaves the model on LSSA unchanged, and
    accepts another implementation; where it can load, it is what unpatch restores."""
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # as if loaded with it on a GPU machine
    lssa_hf.patch(model, variant="lssar", p=5.0)
    with torch.no_grad():
        patched = model(ids()).logits
    with pytest.raises(RuntimeError, match=r"Cannot restore attn_implementation='flash_attention_2'.*"
                                           r"attn_implementation='sdpa'"):
        lssa_hf.unpatch(model)
    assert lssa_hf.settings_of(model) == LSSAConfig("lssar", 5.0)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, patched)
    restored = []
    model.set_attn_implementation = lambda impl: restored.append(impl)  # a machine where flash loads
    lssa_hf.unpatch(model)
    assert restored == ["flash_attention_2"] and not hasattr(model.config, "lssa")


@torch.no_grad()
def test_unpatch_to_another_implementation_equals_that_implementation():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    lssa_hf.unpatch(lssa_hf.patch(model), attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model(ids()).logits, tiny_model("llama")(ids()).logits)
