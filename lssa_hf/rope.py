"""RoPE scaling (YaRN, dynamic NTK, linear, ...) as a setting that composes with any attention.

The context-extension baseline users already have: transformers' own rope-init functions, selected by
``config.rope_parameters`` (transformers 5; ``rope_scaling`` before). Nothing here computes RoPE: it
writes the parameters on the model's (private) config and rebuilds its rotary-embedding modules,
exactly as transformers builds them for a config that had those parameters from the start.

One spelling everywhere (CLI ``--rope yarn:2``, YAML ``rope: {type: yarn, factor: 2}`` or
``rope: yarn:2``, lm-eval ``rope=yarn:2``, ``lssa_hf.from_pretrained(..., rope="yarn:2")``):
``TYPE:FACTOR[:ORIGINAL_MAX_POSITIONS]``, or a dict with ``type``, ``factor``,
``original_max_position_embeddings`` and any other ``rope_parameters`` key (``beta_fast``, ...).
``None`` keeps what the checkpoint has; ``"default"`` removes scaling (plain RoPE).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

# The scaled types of transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS a user sets by hand.
ROPE_TYPES = ("yarn", "dynamic", "linear", "longrope", "llama3")
PLAIN = "default"
# Types whose window (max_position_embeddings) becomes factor x the original one; "dynamic" keeps
# it, since it is the length past which dynamic NTK starts rescaling.
_STRETCHED = ("yarn", "linear", "longrope", "llama3")
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's published values


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling request. ``extra``: further ``rope_parameters`` keys, as (key, value) pairs."""

    type: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    extra: tuple = field(default=())

    def __post_init__(self):
        if self.type == PLAIN:
            return
        if self.type not in ROPE_TYPES:
            raise ValueError(f"Unknown RoPE scaling type {self.type!r}: use one of {ROPE_TYPES} "
                             f"(or {PLAIN!r} for plain RoPE), e.g. rope='yarn:2'.")
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
            raise ValueError(f"RoPE scaling factor must be a number > 1 (the context multiple), got {factor!r}: "
                             "e.g. rope='yarn:2' for twice the window.")
        original = self.original_max_position_embeddings
        if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {original!r}.")
        object.__setattr__(self, "factor", float(factor))

    def spec(self) -> str:
        """The short spelling, e.g. "yarn:2" (extra keys are not part of it)."""
        if self.type == PLAIN:
            return PLAIN
        text = f"{self.type}:{self.factor:g}"
        return text + (f":{self.original_max_position_embeddings}" if self.original_max_position_embeddings else "")

    def to_dict(self) -> dict:
        out = {"type": self.type, "factor": self.factor}
        if self.original_max_position_embeddings:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return {**out, **dict(self.extra)}


def parse_rope(value) -> RopeScaling | None:
    """A ``RopeScaling`` from ``None``, a RopeScaling, "yarn:2[:8192]", "default" or a dict."""
    if value is None or isinstance(value, RopeScaling):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none"):
            return None
        if text == PLAIN:
            return RopeScaling(PLAIN)
        kind, _, rest = text.partition(":")
        factor, _, original = rest.partition(":")
        try:
            return RopeScaling(kind, float(factor) if factor else 1.0, int(original) if original else None)
        except ValueError as error:
            if "could not convert" in str(error) or "invalid literal" in str(error):
                raise ValueError(f"Cannot read RoPE scaling {value!r}: write TYPE:FACTOR[:ORIGINAL_MAX_POSITIONS], "
                                 "e.g. 'yarn:2' or 'dynamic:4:8192'.") from None
            raise
    if isinstance(value, dict):
        values = dict(value)
        kind = values.pop("type", values.pop("rope_type", None))
        if kind is None:
            raise ValueError(f"RoPE scaling {value!r} names no type: add type: yarn|dynamic|linear|longrope|llama3.")
        factor = values.pop("factor", 1.0)
        original = values.pop("original_max_position_embeddings", None)
        return RopeScaling(str(kind).lower(), factor, original, tuple(sorted(values.items())))
    raise TypeError(f"RoPE scaling must be a string like 'yarn:2', a dict or None, got {type(value).__name__}.")


def rotary_modules(model) -> list:
    """(parent, attribute name, module) of every rotary-embedding module: a ``rope_type`` and
    ``inv_freq`` buffers (one per layer type in Gemma3: ``full_attention_inv_freq``, ...)."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if hasattr(child, "rope_type") and any(b.endswith("inv_freq") for b in child._buffers):
                found.append((parent, name, child))
    return found


def rope_parameters_of(config) -> dict | None:
    return getattr(config, "rope_parameters", None) or None


def _nested_keys(config, params: dict) -> list:
    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    return [key for key in params if key in labels]


def scaled_parameters(config, scaling: RopeScaling) -> dict:
    """``config.rope_parameters`` with ``scaling`` applied (a new dict; the base theta is kept).

    Per-layer-type parameters (Gemma3: full and sliding attention) get the scaling on every type
    but "sliding_attention": local layers never see past their window, as in Gemma3's own configs."""
    params = copy.deepcopy(rope_parameters_of(config))
    nested = _nested_keys(config, params)
    targets = [params[key] for key in nested if key != "sliding_attention" and params[key]] if nested else [params]
    for target in targets:
        keep = {k: target[k] for k in ("rope_theta", "partial_rotary_factor") if k in target}
        original = (scaling.original_max_position_embeddings or target.get("original_max_position_embeddings")
                    or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        target.clear()
        target.update(keep)
        if scaling.type == PLAIN:
            target["rope_type"] = PLAIN
            continue
        target.update(rope_type=scaling.type, factor=scaling.factor)
        if scaling.type != "dynamic" and scaling.type != "linear":
            target["original_max_position_embeddings"] = int(original)
        if scaling.type == "llama3":
            for key, default in _LLAMA3_DEFAULTS.items():
                target.setdefault(key, default)
        target.update(dict(scaling.extra))
        if scaling.type == "longrope" and not {"short_factor", "long_factor"} <= set(target):
            raise ValueError("longrope needs per-dimension short_factor and long_factor lists: give them in the dict "
                             "form, e.g. rope={'type': 'longrope', 'short_factor': [...], 'long_factor': [...]}.")
    return params


def check_rope_model(model) -> None:
    config = model.config
    if rope_parameters_of(config) is None or not rotary_modules(model):
        raise ValueError(f"{type(model).__name__} has no rotary position embeddings (e.g. GPT-2's learned absolute "
                         "positions), so RoPE scaling cannot apply: use a RoPE model (Llama, Mistral, Qwen2, ...) "
                         "or drop the rope setting.")


def apply_rope(model, rope):
    """Set RoPE scaling ``rope`` (see ``parse_rope``) on ``model`` (a transformers model or a peft
    model around one); ``None`` leaves the model as it is. Returns the same model.

    The model gets a private config first (so no other model changes), then transformers' own
    parameters and rotary modules: the result equals a model built from the scaled config."""
    from .patching import base_model, own_config

    scaling = parse_rope(rope)
    if scaling is None:
        return model
    model_ = base_model(model)
    check_rope_model(model_)
    _scaled_config(model_.config, scaling)  # validated on a copy first: a refused value changes nothing
    own_config(model_)
    _scaled_config(model_.config, scaling, in_place=True)
    for parent, name, module in rotary_modules(model_):
        setattr(parent, name, _rebuilt(module))
    return model


def _scaled_config(config, scaling: RopeScaling, in_place: bool = False):
    """``config`` (or a copy) with scaled rope parameters on it and its text sub-config, validated
    by transformers (Phi3 accepts only longrope, for example)."""
    config = config if in_place else copy.deepcopy(config)
    native = _original_window(rope_parameters_of(config) or {})
    params = scaled_parameters(config, scaling)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for target in {id(c): c for c in (config, text)}.values():
        if rope_parameters_of(target) is None:
            continue
        original = target.max_position_embeddings
        target.rope_parameters = copy.deepcopy(params)
        if scaling.type in _STRETCHED:
            first = params if "rope_type" in params else next(v for v in params.values() if v and "factor" in v)
            window = first.get("original_max_position_embeddings") or original
            target.max_position_embeddings = int(window * scaling.factor)
        elif scaling.type == PLAIN and native:  # back to the window the checkpoint was trained for
            target.max_position_embeddings = native
        try:
            target.validate_rope()
        except (KeyError, ValueError) as error:
            raise ValueError(f"{type(target).__name__} does not accept RoPE scaling {scaling.spec()!r}: {error}") from None
    return config


def _original_window(params: dict) -> int | None:
    if "rope_type" not in params:
        params = next((v for k, v in params.items() if k != "sliding_attention" and v), {})
    return params.get("original_max_position_embeddings")


def _rebuilt(module):
    """A new rotary module of the same class from its (updated) config, on the old one's device."""
    device = next(b for n, b in module.named_buffers() if n.endswith("inv_freq")).device
    kwargs = {"config": module.config}
    params = inspect.signature(type(module).__init__).parameters
    if "device" in params:
        kwargs["device"] = device
    return type(module)(**kwargs).to(device)


def rope_of(model) -> str:
    """A short description of the RoPE in force: "default", "yarn:2", ... ("none" without RoPE)."""
    from .patching import base_model

    params = rope_parameters_of(base_model(model).config)
    if params is None:
        return "none"
    if "rope_type" not in params:
        params = next((v for k, v in params.items() if k != "sliding_attention" and v), {})
    kind = params.get("rope_type", PLAIN)
    return kind if kind == PLAIN else f"{kind}:{params.get('factor', 1.0):g}"
