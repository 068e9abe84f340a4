"""Public API: patch/unpatch, isolation, persistence, peft, GPT-2 specifics, masks and clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, StaticCache

import lssa_hf
from lssa_hf.integrations.hf_attention import lssa_attention_forward
from tiny_models import CONFIGS, tiny_model


def ids(length=10, batch=2, seed=0):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_unpatch_restores_the_original_bit_for_bit():
    model = tiny_model("llama")
    x = ids()
    before = model(x).logits
    lssa_hf.patch(model, variant="lssar", p=15.0)
    assert lssa_hf.is_patched(model)
    assert not torch.allclose(model(x).logits, before)
    lssa_hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not lssa_hf.is_patched(model)
    assert torch.equal(model(x).logits, before)
    assert not hasattr(model.config, "lssa") and "lssa" not in model.config.to_dict()


@torch.no_grad()
def test_patching_one_model_never_changes_another_built_from_the_same_config():
    config = CONFIGS["llama"]()
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(config).eval()
    b = AutoModelForCausalLM.from_config(config).eval()
    b.load_state_dict(a.state_dict())
    x = ids()
    before = b(x).logits
    lssa_hf.patch(a, variant="lssar", p=3.0)
    assert config._attn_implementation == "sdpa" and b.config._attn_implementation == "sdpa"
    assert torch.equal(b(x).logits, before)
    lssa_hf.patch(b, variant="lssar", p=40.0)  # two settings in one process, each model its own
    assert lssa_hf.settings_of(a).p == 3.0 and lssa_hf.settings_of(b).p == 40.0
    assert not torch.allclose(a(x).logits, b(x).logits)
    c = tiny_model("llama")
    c.load_state_dict(a.state_dict())
    lssa_hf.patch(c, variant="lssar", p=3.0)
    assert torch.equal(a(x).logits, c(x).logits)
    assert all(m.config is a.config for m in a.modules() if "config" in m.__dict__)


def test_attn_implementation_works_once_imported_and_reads_settings_from_config():
    config = CONFIGS["llama"]()
    config.lssa = {"variant": "lssar", "p": 3.0, "backend": "auto"}
    torch.manual_seed(0)
    direct = AutoModelForCausalLM.from_config(config, attn_implementation="lssar").eval()
    patched = lssa_hf.patch(tiny_model("llama"), variant="lssar", p=3.0)
    patched.load_state_dict(direct.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(direct(ids()).logits, patched(ids()).logits, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("variant,p", [("lssa", 15.0), ("lssar", 7.5)])
def test_save_and_load_keep_lssa_and_its_settings(tmp_path, variant, p):
    model = lssa_hf.patch(tiny_model("mistral"), variant=variant, p=p)
    x = ids()
    want = model(x).logits
    model.save_pretrained(tmp_path)
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), lssa_hf.from_pretrained(tmp_path)):
        settings = lssa_hf.settings_of(loaded)
        assert settings is not None and (settings.variant, settings.p) == (variant, p)
        torch.testing.assert_close(loaded.eval()(x).logits, want, rtol=0, atol=0)
    # Overriding the stored settings at load time, and unpatching a model loaded as LSSA.
    other = lssa_hf.from_pretrained(tmp_path, variant="lssar", p=2.0)
    assert lssa_hf.settings_of(other).p == 2.0
    assert lssa_hf.unpatch(other).config._attn_implementation == "sdpa"


@torch.no_grad()
def test_from_pretrained_patches_a_softmax_checkpoint(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = lssa_hf.from_pretrained(tmp_path)
    assert lssa_hf.settings_of(model) == lssa_hf.LSSAConfig(variant="lssar", p=15.0)
    with pytest.raises(TypeError, match="variant"):
        lssa_hf.from_pretrained(tmp_path, attn_implementation="sdpa")


@torch.no_grad()
def test_lora_wrap_and_merge_keep_lssa():
    import peft
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar")
    x = ids()
    want = model(x).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert lssa_hf.is_patched(lora)
    torch.testing.assert_close(lora(x).logits, want)  # LoRA starts as the identity
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.add_(0.1)
    adapted = lora(x).logits
    merged = lora.merge_and_unload()
    assert lssa_hf.is_patched(merged)
    torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-5)
    # Patching through the peft wrapper reaches the base model too.
    lora2 = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lssa_hf.patch(lora2, variant="lssa")
    assert lora2.get_base_model().config._attn_implementation == "lssa"


@torch.no_grad()
def test_static_cache_generation_matches_dynamic_cache():
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar")
    x = ids(6, batch=1)
    dynamic = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(dynamic, static)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_user_4d_mask_equals_the_implicit_causal_mask(kind):
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar")
    x = ids(9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    mask = causal if kind == "bool" else torch.zeros(2, 1, 9, 9).masked_fill(~causal, torch.finfo(torch.float32).min)
    torch.testing.assert_close(model(x, attention_mask=mask).logits, model(x).logits, rtol=0, atol=0)


def test_soft_additive_masks_are_refused():
    model = lssa_hf.patch(tiny_model("llama"), variant="lssa")
    mask = torch.zeros(1, 1, 5, 5) - 0.5
    with pytest.raises(ValueError, match="boolean mask"):
        model(ids(5, batch=1), attention_mask=mask)


@torch.no_grad()
def test_gpt2_cross_attention_counts_only_visible_encoder_keys():
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = lssa_hf.patch(GPT2LMHeadModel(config).eval(), variant="lssar")
    enc = torch.randn(1, 7, 32)
    enc_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    x = ids(5, batch=1)
    padded = model(x, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits
    trimmed = model(x, encoder_hidden_states=enc[:, :5]).logits
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_scaling_is_ignored_because_lssa_has_its_own_temperature():
    layer_scaled = lssa_hf.patch(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True), variant="lssa")
    plain = lssa_hf.patch(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=False), variant="lssa")
    torch.testing.assert_close(layer_scaled(ids()).logits, plain(ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [dict(variant="softmax"), dict(p=0.0), dict(p=-3.0), dict(backend="nope")])
def test_bad_patch_settings_raise_before_touching_the_model(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        lssa_hf.patch(model, **bad)
    assert model.config._attn_implementation == "sdpa"


# Outside the interface in transformers 5.23 and 5.24 (GPT-J was, until 5.24 moved it onto it).
@pytest.mark.parametrize("config_name", ["OpenAIGPTConfig", "BloomConfig", "GPTNeoConfig"])
def test_architectures_without_the_interface_get_a_clear_error(config_name):
    import transformers
    config = getattr(transformers, config_name)(vocab_size=97, n_embd=32, hidden_size=32, n_layer=1, num_layers=1,
                                                n_head=4, num_heads=4, n_positions=64, max_position_embeddings=64,
                                                attention_types=[[["global"], 1]])
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        lssa_hf.patch(model)
    assert model.config._attn_implementation != "lssar"


def test_other_errors_name_the_fix():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lssa_hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing to unpatch"):
        lssa_hf.unpatch(tiny_model("llama"))
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="sinks"):
        lssa_attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(NotImplementedError, match="position biases"):
        lssa_attention_forward(module, q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))


def test_no_mask_forward_is_causal_and_respects_is_causal_and_windows():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    module = torch.nn.Module()
    causal, _ = lssa_attention_forward(module, q, k, v, None)
    explicit, _ = lssa_attention_forward(module, q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(causal, explicit, rtol=0, atol=0)
    full, _ = lssa_attention_forward(module, q, k, v, None, is_causal=False)
    torch.testing.assert_close(full, lssa_attention_forward(module, q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))[0])
    window, _ = lssa_attention_forward(module, q, k, v, None, sliding_window=2)
    band = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)
    torch.testing.assert_close(window, lssa_attention_forward(module, q, k, v, band[None, None])[0])


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_compute_attention_in_float32(dtype):
    model = lssa_hf.patch(tiny_model("llama"), variant="lssar")
    x = ids()
    want = model(x).logits
    got = model.to(dtype)(x).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_mask_function_materialises_every_mask_but_plain_causal():
    from transformers.masking_utils import sliding_window_causal_mask_function

    from lssa_hf.integrations.hf_attention import lssa_mask

    plain = dict(batch_size=2, q_length=6, kv_length=6, allow_is_causal_skip=True)
    assert lssa_mask(**plain) is None  # rebuilt exactly by the backend
    padded = lssa_mask(**plain, attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]).bool())
    assert padded.shape == (2, 1, 6, 6) and not padded[1, 0, :, :2].any()
    decode = lssa_mask(batch_size=1, q_length=1, kv_length=9, q_offset=8, allow_is_causal_skip=True)
    assert decode is not None and decode.all()
    static_prefill = lssa_mask(batch_size=1, q_length=4, kv_length=16, allow_is_causal_skip=True)
    assert static_prefill[0, 0, -1].sum() == 4
    window = lssa_mask(**plain, mask_function=sliding_window_causal_mask_function(3), local_size=3)
    assert window is not None and window[0, 0, -1].sum() == 3
    assert lssa_mask(**{**plain, "allow_is_causal_skip": False}) is not None  # packed sequences
