"""LoRA on the attention projections of each architecture, with peft."""

from __future__ import annotations

from torch import nn

from ..patching import base_model
from ..temperature import ATTRIBUTE as TEMPERATURE
from ..temperature import attention_modules as _attention_modules
from ..temperature import has_temperatures
from .config import FinetuneConfig

# model_type -> (all attention projections, the ones that form the scores q.k). peft matches a name
# when the module path ends with it, so GPT-2's "attn.c_proj" leaves the MLP's c_proj alone.
LLAMA_LIKE = (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj"])
ATTENTION_MODULES = {
    **{t: LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
                              "gemma3_text", "olmo", "olmo2", "granite", "starcoder2", "smollm3", "cohere")},
    "phi3": (["qkv_proj", "o_proj"], ["qkv_proj"]),  # fused: q/k/v share one LoRA
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["attn.c_attn"]),
    "gpt_neox": (["query_key_value", "attention.dense"], ["query_key_value"]),
}


def attention_targets(model, config: FinetuneConfig | None = None) -> tuple[list[str], list[str]]:
    """(LoRA targets, q/k targets for the warm start): the config's, else the architecture's defaults,
    else every Linear inside the attention modules (q/k then unknown: all of them)."""
    model_type = base_model(model).config.model_type
    found = ATTENTION_MODULES.get(model_type)
    if found is None:
        names = sorted({name.rsplit(".", 1)[-1] for module in attention_modules(model)
                        for name, child in module.named_children()
                        if isinstance(getattr(child, "base_layer", child), nn.Linear)})  # also once LoRA-wrapped
        found = (names, names)
    targets, qk = found
    if config is not None:
        targets = config.target_modules or targets
        qk = config.warm_start_targets or qk
    return list(targets), list(qk)


def attention_modules(model) -> list[nn.Module]:
    """The attention module of every layer, in order."""
    return _attention_modules(base_model(model))


def norm_modules(model) -> list[str]:
    """Leaf names of the normalisation layers (RMSNorm, LayerNorm, ...): trained via modules_to_save."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in base_model(model).named_modules()
                   if name and "norm" in type(m).__name__.lower()})


def embedding_modules(model) -> list[str]:
    names = {n for n, m in base_model(model).named_modules() if m is base_model(model).get_input_embeddings()}
    return sorted(n.rsplit(".", 1)[-1] for n in names)


def add_lora(model, config: FinetuneConfig):
    """``model`` wrapped in a peft LoRA model per ``config`` (seed the RNG first: LoRA A is random)."""
    from peft import LoraConfig, get_peft_model

    targets, qk = attention_targets(model, config)
    if config.warm_start and not set(qk) <= set(targets):
        raise ValueError(f"The warm start trains {qk}, which must be among the LoRA targets {targets}.")
    to_save = (norm_modules(model) if config.train_norms else []) + (
        embedding_modules(model) if config.train_embeddings else []) + (
        [TEMPERATURE] if has_temperatures(base_model(model)) else [])  # learned per-head temperatures
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=to_save or None, task_type="CAUSAL_LM",
                      ensure_weight_tying=config.train_embeddings)
    return get_peft_model(model, lora)
