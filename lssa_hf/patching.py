"""Switch a transformers model's attention: ``set_attention`` (any name in ``ATTENTIONS``), built on
``patch`` / ``unpatch``; ``update_settings`` for cheap changes of a patched model (a p schedule);
``from_pretrained``."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging

from transformers import PreTrainedModel

from .integrations.hf_attention import register
from .rope import apply_rope
from .settings import CONFIG_KEY, DEFAULT_P, PATCHED, SOFTMAX, LSSAConfig, check_attention
from .temperature import (add_temperatures, attention_modules, has_temperatures, num_heads, remove_temperatures,
                          restore_temperatures)

logger = logging.getLogger(__name__)
_ORIGINAL = "_lssa_original_attn_implementation"  # model attribute set by patch()


def base_model(model) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"lssa_hf works on transformers PreTrainedModel instances, got {type(model).__name__}.")
    return model


def unsupported_parts(model: PreTrainedModel) -> list[str]:
    """Classes inside ``model`` that compute attention without the AttentionInterface."""
    bad = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            cls = type(module)
            if not (cls._supports_attention_backend and cls._can_set_attn_implementation()):
                bad.append(cls.__name__)
    return sorted(set(bad))


def check_supported(model: PreTrainedModel) -> None:
    if any("sinks" in m._parameters for m in model.modules()):
        raise NotImplementedError(
            f"{type(model).__name__} uses attention sinks (a learned logit in the softmax denominator), which "
            "LSSA's softplus normalisation does not have; this model cannot use LSSA."
        )
    bad = unsupported_parts(model)
    if bad:
        raise NotImplementedError(
            f"{', '.join(bad)} computes attention in its own code, not through transformers' AttentionInterface, "
            "so LSSA cannot replace its softmax. Use an architecture that routes attention through the "
            "interface (Llama, Mistral, Qwen2/3, Gemma, Phi3, GPT-2, GPT-NeoX, ...; `lssa-hf info` lists them)."
        )


def check_layers(model: PreTrainedModel, settings: LSSAConfig) -> None:
    """softmax_layers and softmax_heads must name layers (attention modules carry ``layer_idx``) and
    query heads the model has."""
    wanted = settings.softmax_layers + tuple(layer for layer, _ in settings.softmax_heads)
    if not wanted:
        return
    modules = {getattr(m, "layer_idx", None): m for m in attention_modules(model)}
    missing = sorted({i for i in wanted if i not in modules})
    if missing:
        known = sorted(i for i in modules if i is not None)
        raise ValueError(f"softmax layers {missing} are not layers of {type(model).__name__} "
                         f"(its attention layers: {known[0]}..{known[-1]})." if known else
                         f"{type(model).__name__}'s attention modules carry no layer_idx: softmax_layers and "
                         "softmax_heads cannot apply.")
    for layer, heads in settings.softmax_heads:
        count = num_heads(modules[layer])
        if heads[-1] >= count:
            raise ValueError(f"softmax_heads: layer {layer} of {type(model).__name__} has {count} query heads "
                             f"(0..{count - 1}), not head {heads[-1]}.")


def all_configs(config):
    """A config and its sub-configs, depth first."""
    yield config
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            yield from all_configs(sub)


def own_config(model: PreTrainedModel) -> None:
    """Give ``model`` a private copy of its config so patching never reaches another model."""
    old, new = model.config, copy.deepcopy(model.config)
    mapping = {id(a): b for a, b in zip(all_configs(old), all_configs(new))}
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in mapping:
            module.config = mapping[id(config)]


def _set_settings(model: PreTrainedModel, settings: LSSAConfig | None) -> None:
    for config in all_configs(model.config):
        if settings is None:
            config.__dict__.pop(CONFIG_KEY, None)
        else:
            setattr(config, CONFIG_KEY, settings.to_dict())
    # Saved into config.json, so loading the checkpoint (with lssa_hf imported) selects LSSA again;
    # without lssa_hf, transformers refuses the unknown implementation instead of using softmax.
    if settings is None:
        model.config.__dict__.pop("attn_implementation", None)
    else:
        model.config.attn_implementation = settings.variant


def _warn_ignored(model: PreTrainedModel) -> None:
    for config in all_configs(model.config):
        if getattr(config, "attn_logit_softcapping", None):
            logger.warning("attn_logit_softcapping=%s is not applied under LSSA: its scores are bounded cosines "
                           "scaled by log(d)*log(N).", config.attn_logit_softcapping)
            return


def patch(model, variant: str = "lssar", p: float = DEFAULT_P, backend: str = "auto",
          head_temperature: bool | None = None, ssmax_length: int | None = None, softmax_layers=None,
          softmax_heads=None):
    """Make ``model`` (a transformers model, or a peft model around one) use LSSA or LSSAR attention.

    The settings are stored on the model's own config (a private copy: other models built from the
    same config object are untouched) and saved by ``save_pretrained``. ``head_temperature=True``
    adds a learnable per-head multiplier of the length scale to every attention module (tau = 1 at
    first, see ``lssa_hf.temperature``); None keeps the temperatures the model already has, if any.
    ``variant="ssmax"`` is the scaled-softmax baseline (``lssa_hf.ssmax``; ``ssmax_length``: the
    visible-key count at which it equals softmax, default 512). ``softmax_layers``: layer indices
    that keep softmax attention (a hybrid); ``softmax_heads``: query heads kept on softmax inside LSSA
    layers, ``{layer: [heads]}``; None keeps the stored ones. Returns the same model.
    """
    model_ = base_model(model)
    stored = LSSAConfig.of(model_.config) or LSSAConfig()
    ssmax_length = stored.ssmax_length if ssmax_length is None else ssmax_length
    softmax_layers = stored.softmax_layers if softmax_layers is None else softmax_layers
    softmax_heads = stored.softmax_heads if softmax_heads is None else softmax_heads
    if head_temperature is None:
        stored = LSSAConfig.of(model_.config)
        if stored is not None and stored.head_temperature and not has_temperatures(model_):
            raise ValueError("This checkpoint was saved with learned per-head temperatures, which are not loaded: "
                             "load it with lssa_hf.from_pretrained(path), or pass head_temperature=False to drop them.")
        head_temperature = has_temperatures(model_)
    elif not head_temperature and has_temperatures(model_):
        raise ValueError("This model carries learned per-head temperatures; patch it with head_temperature=True "
                         "(or None) to keep them, or unpatch it first to drop them.")
    settings = LSSAConfig(variant=variant, p=p, backend=backend, head_temperature=head_temperature,
                          ssmax_length=ssmax_length, softmax_layers=softmax_layers, softmax_heads=softmax_heads)
    check_supported(model_)
    check_layers(model_, settings)
    if not hasattr(model_, _ORIGINAL):
        original = model_.config._attn_implementation
        if original in PATCHED:  # loaded as LSSA: "original" is transformers' default
            original = model_.get_correct_attn_implementation(None)
        setattr(model_, _ORIGINAL, original)
        own_config(model_)
    _warn_ignored(model_)
    _set_settings(model_, settings)
    if head_temperature:
        add_temperatures(model_)
    model_.set_attn_implementation(settings.variant)
    return model


def unpatch(model, attn_implementation: str | None = None):
    """Restore the attention implementation ``model`` had before ``patch`` (or ``attn_implementation``).

    If transformers cannot load that implementation here (flash_attention_2 without flash-attn, say)
    the model stays on LSSA, unchanged, and the error says so. Returns the same model.
    """
    model_ = base_model(model)
    if not is_patched(model_):
        raise ValueError("This model does not use LSSA; there is nothing to unpatch.")
    original = attn_implementation or model_.__dict__.get(_ORIGINAL)
    if original is None:
        original = model_.get_correct_attn_implementation(None)  # loaded as LSSA: transformers' default
    try:
        model_.set_attn_implementation(original)
    except (ImportError, ValueError) as err:
        raise RuntimeError(f"Cannot restore attn_implementation={original!r} on this machine ({err}). The model "
                           "still uses LSSA; install what it needs and unpatch again, or pick another one: "
                           "lssa_hf.unpatch(model, attn_implementation='sdpa').") from err
    model_.__dict__.pop(_ORIGINAL, None)
    _set_settings(model_, None)
    remove_temperatures(model_)
    return model


def is_patched(model) -> bool:
    """True when the model's attention runs through an LSSA backend."""
    return base_model(model).config._attn_implementation in PATCHED


def settings_of(model) -> LSSAConfig | None:
    """The LSSA settings in force for ``model`` (None if it uses another attention)."""
    model_ = base_model(model)
    if not is_patched(model_):
        return None
    stored = LSSAConfig.of(model_.config) or LSSAConfig()
    return LSSAConfig(variant=model_.config._attn_implementation, p=stored.p, backend=stored.backend,
                      head_temperature=stored.head_temperature, ssmax_length=stored.ssmax_length,
                      softmax_layers=stored.softmax_layers, softmax_heads=stored.softmax_heads)


def from_pretrained(name_or_path: str, variant: str | None = None, p: float | None = None,
                    backend: str | None = None, model_class=None, head_temperature: bool | None = None,
                    rope=None, **kwargs):
    """Load a checkpoint (hub name or folder) with LSSA attention.

    An LSSA checkpoint saved by ``save_pretrained`` keeps its settings and learned per-head
    temperatures; arguments given here override them. A softmax checkpoint is patched with
    ``variant`` (default "lssar"), ``p`` (default 15) and ``head_temperature`` (default False).
    ``rope``: RoPE scaling to set (``lssa_hf.rope.parse_rope``: "yarn:2", a dict, "default"); None
    keeps the checkpoint's own (a saved YaRN checkpoint stays YaRN).
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if "attn_implementation" in kwargs:
        raise TypeError("lssa_hf.from_pretrained sets the attention itself: pass variant='lssa'|'lssar' instead "
                        "of attn_implementation.")
    model = model_class.from_pretrained(name_or_path, **kwargs)
    apply_rope(model, rope)
    stored = LSSAConfig.of(model.config) or LSSAConfig()
    patch(model, variant=variant or stored.variant, p=stored.p if p is None else p,
          backend=backend or stored.backend,
          head_temperature=stored.head_temperature if head_temperature is None else head_temperature)
    restore_temperatures(model, name_or_path, **kwargs)
    return model


_PATCH_SETTINGS = [name for name in inspect.signature(patch).parameters if name not in ("model", "variant")]


def set_attention(model, attention: str, **settings):
    """Give ``model`` the attention named ``attention`` (one of ``lssa_hf.ATTENTIONS``), the one verb
    every command, recipe and harness uses. "softmax" is the checkpoint's own attention: a patched
    model is unpatched (LSSA ``settings`` do not apply to it and are ignored); every other name
    ("lssa", "lssar", "ssmax") is ``patch(model, variant=attention, **settings)``. Returns the same model."""
    check_attention(attention)
    unknown = set(settings) - set(_PATCH_SETTINGS)
    if unknown:
        raise TypeError(f"Unknown attention settings {sorted(unknown)}: use {_PATCH_SETTINGS}.")
    if attention == SOFTMAX:
        if is_patched(model):
            unpatch(model)
        return model
    return patch(model, variant=attention, **settings)


def update_settings(model, **changes) -> LSSAConfig:
    """Change ``p`` or ``backend`` of a patched model in place, without patching again (cheap enough
    for every training step). Returns the new settings."""
    model_ = base_model(model)
    current = settings_of(model_)
    if current is None:
        raise ValueError("This model does not use LSSA: patch it (lssa_hf.set_attention) before updating settings.")
    fixed = set(changes) & {"variant", "head_temperature"}
    if fixed:
        raise ValueError(f"{sorted(fixed)} change the model's modules or implementation: use lssa_hf.patch.")
    settings = dataclasses.replace(current, **changes)
    check_layers(model_, settings)
    _set_settings(model_, settings)
    return settings


register()  # idempotent: ``import lssa_hf`` has done it, unless another import hook loaded transformers
