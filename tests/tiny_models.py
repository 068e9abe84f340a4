"""Tiny random models built from configs (no downloads), one per supported architecture."""

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, MixtralConfig, Phi3Config, Qwen2Config)

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                 layer_types=["sliding_attention", "full_attention"]),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=5, query_pre_attn_scalar=8),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                       layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**COMMON, sliding_window=6),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               scale_attn_by_inverse_layer_idx=True),
}


def tiny_model(name: str, seed: int = 0, **overrides):
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
