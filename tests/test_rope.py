"""RoPE scaling as a setting: it reaches the rotary embedding for real, equals transformers' own
scaled model bit for bit, composes with LSSAR, survives save/load and LoRA merge, refuses bad values."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import lssa_hf
from lssa_hf.rope import RopeScaling, apply_rope, parse_rope, rope_of
from tiny_models import tiny_model

LENGTH = 300  # past the tiny models' 256-position window


def ids(length=LENGTH, batch=1, seed=0):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_of(model):
    """transformers' own model built from the (scaled) config, with the same weights."""
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).eval()
    reference.load_state_dict(model.state_dict())
    return reference


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("spec", ["yarn:2", "dynamic:2", "linear:4", "llama3:8"])
@torch.no_grad()
def test_rope_scaling_equals_transformers_own_scaled_model_bit_for_bit(arch, spec):
    model, x = tiny_model(arch), ids()
    before = model(x).logits
    apply_rope(model, spec)
    assert rope_of(model) == spec and model.config.rope_parameters["rope_type"] == spec.split(":")[0]
    after = model(x).logits
    assert (after - before).abs().max() > 1e-5  # it reaches the rotary embedding
    assert torch.equal(reference_of(model)(x).logits, after)


@torch.no_grad()
def test_yarn_parameters_follow_transformers_conventions():
    model = apply_rope(tiny_model("llama"), {"type": "yarn", "factor": 4, "beta_fast": 16})
    params = model.config.rope_parameters
    assert params == {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 256, "beta_fast": 16}
    assert model.config.max_position_embeddings == 1024
    apply_rope(model, "yarn:2")  # re-scaling starts from the original window, not the stretched one
    assert model.config.rope_parameters["original_max_position_embeddings"] == 256
    assert model.config.max_position_embeddings == 512
    apply_rope(model, "default")
    assert rope_of(model) == "default" and model.config.max_position_embeddings == 256
    assert torch.equal(model(ids()).logits, tiny_model("llama")(ids()).logits)


@torch.no_grad()
def test_rope_scaling_never_changes_another_model_and_composes_with_lssar():
    a, b = tiny_model("llama"), tiny_model("llama")
    x = ids()
    plain_lssar = lssa_hf.patch(tiny_model("llama"), variant="lssar", p=5.0)(x).logits
    apply_rope(a, "yarn:2")
    lssa_hf.patch(a, variant="lssar", p=5.0)
    assert rope_of(b) == "default" and rope_of(a) == "yarn:2"
    assert torch.equal(b(x).logits, tiny_model("llama")(x).logits)
    both = a(x).logits
    assert not torch.allclose(both, plain_lssar)
    reference = lssa_hf.patch(reference_of(lssa_hf.unpatch(copy.deepcopy(a))), variant="lssar", p=5.0)
    assert torch.equal(reference(x).logits, both)
    lssa_hf.unpatch(a)
    assert rope_of(a) == "yarn:2"  # unpatch restores the attention only


@torch.no_grad()
def test_rope_survives_save_load_and_lora_merge(tmp_path):
    from peft import LoraConfig, get_peft_model

    x = ids()
    model = lssa_hf.patch(apply_rope(tiny_model("llama"), "yarn:2"), variant="lssar", p=5.0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    assert rope_of(merged) == "yarn:2"
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    loaded = lssa_hf.from_pretrained(str(tmp_path))
    assert rope_of(loaded) == "yarn:2" and lssa_hf.settings_of(loaded).variant == "lssar"
    assert torch.equal(loaded(x).logits, merged(x).logits)
    rescaled = lssa_hf.from_pretrained(str(tmp_path), rope="yarn:4")  # told: the new setting wins
    assert rope_of(rescaled) == "yarn:4"


def test_lora_through_peft_keeps_rope_set_on_the_wrapper():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    apply_rope(peft_model, "dynamic:2")
    assert rope_of(peft_model) == "dynamic:2"


@pytest.mark.parametrize("bad, message", [
    ("foo:2", "Unknown RoPE scaling type"), ("yarn:1", "factor must be a number > 1"),
    ("yarn:0.5", "factor must be a number > 1"), ("yarn:x", "TYPE:FACTOR"), ("yarn", "factor must be"),
    ({"factor": 2}, "names no type"), ("longrope:2", "short_factor and long_factor"), (3, "string like 'yarn:2'"),
    ({"type": "yarn", "factor": True}, "factor must be"), ("yarn:2:0", "positive integer"),
])
def test_bad_rope_values_are_refused_with_the_fix(bad, message):
    model = tiny_model("llama")
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises((ValueError, TypeError), match=message):
        apply_rope(model, bad)
    assert model.config.rope_parameters == before


def test_models_without_rope_or_refusing_a_type_are_told_why():
    with pytest.raises(ValueError, match="no rotary position embeddings"):
        apply_rope(tiny_model("gpt2"), "yarn:2")
    phi3 = tiny_model("phi3")
    with pytest.raises(ValueError, match="does not accept RoPE scaling 'yarn:2'"):
        apply_rope(phi3, "yarn:2")
    assert rope_of(phi3) == "default"


def test_one_spelling_everywhere():
    assert parse_rope("yarn:2") == parse_rope({"type": "yarn", "factor": 2}) == RopeScaling("yarn", 2.0)
    assert parse_rope("YaRN:2:8192").original_max_position_embeddings == 8192
    assert parse_rope(None) is None and parse_rope("none") is None
    assert parse_rope("dynamic:4").spec() == "dynamic:4"
    from lssa_hf.finetune.config import FinetuneConfig

    with pytest.raises(ValueError, match="Unknown RoPE scaling type"):
        FinetuneConfig(rope="yaml:2")
    assert FinetuneConfig(rope={"type": "yarn", "factor": 2}).rope == {"type": "yarn", "factor": 2}


def test_extrapolate_specs_take_rope_scaling():
    from lssa_hf.extrapolation import ModelSpec

    spec = ModelSpec.parse("smollm2@softmax+yarn:2")
    assert (spec.path, spec.variant, spec.rope, spec.name()) == ("smollm2", "softmax", "yarn:2", "smollm2 + yarn:2 as softmax")
    assert ModelSpec.parse("m@lssar:5", rope="dynamic:4").rope == "dynamic:4"  # --rope for specs naming none
    with pytest.raises(ValueError, match="Unknown RoPE scaling type"):
        ModelSpec.parse("m+yorn:2")


def test_compare_rows_take_rope_scaling():
    from lssa_hf.commands.compare import DEFAULT_ROWS, parse_row

    assert "softmax+yarn:2" in DEFAULT_ROWS
    assert parse_row("lssar+yarn:2") == ("lssar", "yarn:2") and parse_row("softmax") == ("softmax", None)
    with pytest.raises(SystemExit, match="Unknown attention"):
        parse_row("flash+yarn:2")
    with pytest.raises(ValueError, match="factor must be"):
        parse_row("softmax+yarn:1")
