"""Names, defaults and the settings of the LSSA backends, defined once. Pure Python: no torch, no
transformers, so every other module (the math included) imports from here.

A patched model stores its settings on its config as ``config.lssa`` (a plain dict, saved in
config.json); ``LSSAConfig.of(config)`` parses it once per distinct value, not on every call.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields

VARIANTS = ("lssa", "lssar")  # the LSSA variants of the math (lssa_hf.functional)
SSMAX = "ssmax"  # scaled-softmax baseline (lssa_hf.ssmax): same mask glue, SDPA underneath
PATCHED = VARIANTS + (SSMAX,)  # attention implementations lssa_hf registers (and ``patch`` sets)
SOFTMAX = "softmax"  # a checkpoint's own attention
ATTENTIONS = (SOFTMAX,) + PATCHED  # what commands, configs and the harness accept: a new one is one name here
DEFAULT_P = 15.0  # LSSAR's re-weighting power (paper default)
DEFAULT_SSMAX_LENGTH = 512  # keys at which ssmax equals softmax unless told (the recipes' block size)
BACKENDS = ("auto", "materialized", "blocked", "native", "blocked_compiled", "flex", "triton")  # see lssa_hf.attention
BACKEND_ENV = "LSSA_BACKEND"  # forces a backend wherever the argument is "auto"
CONFIG_KEY = "lssa"


def check_settings(variant: str, p: float) -> None:
    """Raise a ValueError that names the fix for an unknown variant or a p that is not a number > 0
    (for either variant: "lssa" ignores p, but it is stored with the settings)."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"Unknown LSSA variant {variant!r}: use one of {VARIANTS}.")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < math.inf:  # NaN fails too
        raise ValueError(f"The re-weighting power must be a finite number p > 0, e.g. p={DEFAULT_P} (the paper's "
                         f"default; variant='lssa' ignores it), got {p!r} ({type(p).__name__}).")


def check_length(length) -> int:
    """An ssmax length: the number of visible keys at which ssmax equals softmax."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"ssmax_length (the number of keys at which ssmax equals softmax) must be an integer >= 2, "
                         f"got {length!r}.")
    return length


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"Unknown LSSA variant or attention {attention!r}: use one of {ATTENTIONS}.")


def resolve_backend(backend: str = "auto") -> str:
    """The backend a call asks for: an explicit (non-"auto") argument, else ``LSSA_BACKEND``, else
    "auto" (chosen per call by ``lssa_hf.attention.choose_backend``)."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown LSSA backend {backend!r}: use one of {BACKENDS}.")
    return backend


@dataclass(frozen=True)
class LSSAConfig:
    """How a patched model computes attention.

    variant: "lssa" (softplus + length scaling), "lssar" (with re-weighting) or "ssmax" (the
        scaled-softmax baseline, ``lssa_hf.ssmax``).
    p: re-weighting power of LSSAR (paper default 15.0); ignored by "lssa" and "ssmax".
    backend: "auto" or a forced kernel path (``BACKENDS``; ``LSSA_BACKEND`` applies where "auto").
    head_temperature: every attention module carries a learnable per-head multiplier of the length
        scale (``lssa_hf.temperature``); False is the paper's fixed scale.
    ssmax_length: "ssmax" only: the number of visible keys at which it equals softmax.
    softmax_layers: indices of layers that keep softmax attention (SDPA): a hybrid model.
    softmax_heads: query heads that keep softmax attention inside otherwise LSSA layers, as
        ``{layer: [heads]}`` (stored as sorted ``(layer, heads)`` pairs, which config.json keeps).
    """

    variant: str = "lssar"
    p: float = DEFAULT_P
    backend: str = "auto"
    head_temperature: bool = False
    ssmax_length: int = DEFAULT_SSMAX_LENGTH
    softmax_layers: tuple = ()
    softmax_heads: tuple = ()

    def __post_init__(self):
        if self.variant == SSMAX:
            check_length(self.ssmax_length)
        else:
            check_settings(self.variant, self.p)
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown LSSA backend {self.backend!r}: use one of {BACKENDS}.")
        object.__setattr__(self, "p", float(self.p))
        layers = self.softmax_layers or ()
        if isinstance(layers, (int, str)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"softmax_layers must be a list of layer indices (integers >= 0), got {layers!r}.")
        object.__setattr__(self, "softmax_layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "softmax_heads", _head_map(self.softmax_heads, self.softmax_layers))
        object.__setattr__(self, "head_temperature", bool(self.head_temperature))

    def heads_on_softmax(self, layer) -> tuple:
        """The query heads of ``layer`` kept on softmax (empty: none)."""
        return next((heads for i, heads in self.softmax_heads if i == layer), ())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "LSSAConfig":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)  # not fields(cls): torch.compile traces this
        if unknown:
            raise ValueError(f"Unknown LSSA settings {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}.")
        return cls(**values)

    @classmethod
    def of(cls, config) -> "LSSAConfig | None":
        """The settings stored on a transformers config, or None if it has none. Runs on every layer of
        every forward: a value already seen is not parsed (nor checked) again."""
        values = getattr(config, CONFIG_KEY, None)
        if values is None:
            return None
        try:  # lists (softmax_layers, softmax_heads read back from config.json) as tuples: hashable
            return _parse(tuple((k, _frozen(v)) for k, v in values.items()))
        except TypeError:  # an unhashable value: parse it plainly (and let the checks name it)
            return cls.from_dict(values)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _head_map(value, softmax_layers: tuple) -> tuple:
    """``{layer: [heads]}`` or ``(layer, heads)`` pairs as sorted ``(layer, (heads...))`` pairs."""
    fix = "softmax_heads must map layer indices to lists of query-head indices, e.g. {12: [0, 3]}"
    pairs = value.items() if isinstance(value, dict) else value or ()
    try:
        pairs = [(int(layer) if isinstance(layer, str) and layer.isdigit() else layer, heads) for layer, heads in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"{fix}, got {value!r}.") from None
    out = {}
    for layer, heads in pairs:
        if not _is_index(layer) or isinstance(heads, (int, str)) or not all(_is_index(h) for h in heads or ()):
            raise ValueError(f"{fix}, got {value!r}.")
        if layer in softmax_layers:
            raise ValueError(f"layer {layer} is in softmax_layers (every head on softmax already): drop it from "
                             f"softmax_heads or from softmax_layers.")
        if heads:
            out[layer] = tuple(sorted(set(out.get(layer, ()) + tuple(heads))))
    return tuple(sorted(out.items()))


@functools.lru_cache(maxsize=64)
def _parse(items: tuple) -> LSSAConfig:
    return LSSAConfig.from_dict(dict(items))
