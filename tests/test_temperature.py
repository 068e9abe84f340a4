"""Learned per-head temperatures (``patch(head_temperature=True)``): math, persistence, training."""

import math
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import lssa_hf
from lssa_hf.temperature import ATTRIBUTE, attention_modules, temperatures
from reference import reference_attention
from test_reference_models import expected_mask
from tiny_models import tiny_model

REF = "lssa_test_reference_temperature"


def ids(length=12, batch=2, seed=0):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_random_temperatures(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in attention_modules(model):
            log_tau = getattr(module, ATTRIBUTE).log_temperature
            log_tau.copy_(torch.rand(log_tau.shape, generator=g, dtype=torch.float64) * 2 - 0.7)


def reference_logits(model, tokens, variant):
    """The same model with attention replaced by the float64 reference using each module's tau."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        tau = getattr(module, ATTRIBUTE)().detach()
        mask = expected_mask(torch.ones(tokens.shape), kwargs.get("sliding_window"))
        out = reference_attention(query, key, value, mask, variant=variant, temperature=tau)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(REF, attention)
    original = model.config._attn_implementation
    model.set_attn_implementation(REF)
    try:
        return model(tokens).logits
    finally:
        model.set_attn_implementation(original)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_learned_temperatures_equal_the_reference_and_start_at_the_paper(arch, variant):
    model = tiny_model(arch).double()
    plain = lssa_hf.patch(tiny_model(arch).double(), variant=variant)(ids()).logits
    lssa_hf.patch(model, variant=variant, head_temperature=True)
    assert torch.equal(model(ids()).logits, plain)  # tau = 1: exactly the paper's scores
    set_random_temperatures(model)
    got = model(ids()).logits
    assert (got - plain).abs().max() > 1e-3  # the temperatures are used...
    torch.testing.assert_close(got, reference_logits(model, ids(), variant), rtol=1e-9, atol=1e-9)  # ...exactly


def test_temperatures_get_gradients_and_unpatch_removes_them():
    model = tiny_model("llama")
    original_keys = set(model.state_dict())
    before = model(ids()).logits.detach()
    lssa_hf.patch(model, variant="lssar", head_temperature=True)
    model(ids()).logits.square().mean().backward()
    grads = [getattr(m, ATTRIBUTE).log_temperature.grad for m in attention_modules(model)]
    assert len(grads) == model.config.num_hidden_layers
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    lssa_hf.unpatch(model)
    assert set(model.state_dict()) == original_keys
    assert torch.equal(model(ids()).logits, before)


def test_save_and_load_keep_learned_temperatures(tmp_path):
    model = lssa_hf.patch(tiny_model("llama"), variant="lssa", head_temperature=True)
    set_random_temperatures(model)
    want = model(ids()).logits
    model.save_pretrained(tmp_path)
    loaded = lssa_hf.from_pretrained(tmp_path)
    assert lssa_hf.settings_of(loaded).head_temperature
    torch.testing.assert_close(temperatures(loaded), temperatures(model), rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids()).logits, want, rtol=1e-6, atol=1e-6)
    # transformers alone drops the temperatures: the model refuses to run rather than run without them
    bare = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="lssa_hf.from_pretrained"):
        bare(ids())
    with pytest.raises(ValueError, match="lssa_hf.from_pretrained"):  # re-patching must not drop them silently
        lssa_hf.patch(bare, variant="lssar")


def test_repatching_keeps_or_refuses_to_drop_learned_temperatures():
    model = lssa_hf.patch(tiny_model("llama"), variant="lssa", head_temperature=True)
    set_random_temperatures(model)
    kept = temperatures(model)
    lssa_hf.patch(model, variant="lssar", p=4.0)  # head_temperature=None keeps them
    assert lssa_hf.settings_of(model).head_temperature
    assert torch.equal(temperatures(model), kept)
    with pytest.raises(ValueError, match="head_temperature=True"):
        lssa_hf.patch(model, variant="lssar", head_temperature=False)


def test_temperature_settings_are_validated_and_shapes_checked():
    model = lssa_hf.patch(tiny_model("llama"), variant="lssa", head_temperature=True)
    module = attention_modules(model)[0]
    module.lssa_temperature.log_temperature = torch.nn.Parameter(torch.zeros(3))  # wrong head count
    with pytest.raises(ValueError, match="one value per query head"):
        model(ids())


def _layer0_output(model, tokens):
    """Layer 0's attention output in a full forward (its input, the embeddings, is the same for any attention)."""
    seen = {}
    handle = attention_modules(model)[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out[0]))
    try:
        model(tokens)
    finally:
        handle.remove()
    return seen["out"].double()


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_calibrated_temperatures_match_the_softmax_layers(variant):
    from lssa_hf.finetune.calibrate import GRID, calibrate_temperatures

    tokens = ids(length=48)
    softmax = tiny_model("llama").double()
    target = _layer0_output(softmax, tokens)
    model = lssa_hf.patch(tiny_model("llama").double(), variant=variant, head_temperature=True)
    result = calibrate_temperatures(model, tokens)
    modules = attention_modules(model)
    assert lssa_hf.settings_of(model).variant == variant and model.training is False
    for module, taus, before, after in zip(modules, result["tau"], result["mse_at_1"], result["mse"]):
        assert torch.allclose(getattr(module, ATTRIBUTE)().double(), torch.tensor(taus, dtype=torch.float64), rtol=1e-3)
        assert all(any(abs(t - g) < 1e-3 * g for g in GRID) for t in taus) and after <= before
    assert any(t != 1.0 for layer in result["tau"] for t in layer)  # the paper's scale is not what fits best
    # layer 0 independently: the chosen taus give the reported error against the softmax model's output ...
    err = lambda: torch.nn.functional.mse_loss(_layer0_output(model, tokens), target).item()
    assert err() == pytest.approx(result["mse"][0], rel=1e-6)
    assert err() < result["mse_at_1"][0]
    # ... and no single head moved one grid step does better (each head is at its best, the others held)
    log_tau = getattr(modules[0], ATTRIBUTE).log_temperature
    with torch.no_grad():
        for head in range(log_tau.numel()):
            for step in (-0.5, 0.5):
                if not GRID[0] <= math.exp(log_tau[head].item() + step * math.log(2)) <= GRID[-1] * 1.001:
                    continue  # the grid's edge
                log_tau[head] += step * math.log(2)
                assert err() >= result["mse"][0] * (1 - 1e-9)
                log_tau[head] -= step * math.log(2)
    assert _layer0_output(softmax, tokens).equal(target)  # the softmax model is untouched


def test_calibration_needs_a_patched_model_with_temperatures():
    from lssa_hf.finetune.calibrate import calibrate_temperatures

    with pytest.raises(ValueError, match="patch the model first"):
        calibrate_temperatures(tiny_model("llama"), ids())
    with pytest.raises(ValueError, match="head_temperature=True"):
        calibrate_temperatures(lssa_hf.patch(tiny_model("llama")), ids())
