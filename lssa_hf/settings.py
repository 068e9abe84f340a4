"""User-facing settings of the LSSA backends, stored on a model's config as ``config.lssa``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .functional import DEFAULT_P, VARIANTS, check_settings

CONFIG_KEY = "lssa"
SSMAX = "ssmax"  # scaled-softmax baseline (lssa_hf.ssmax): same mask glue, SDPA underneath
PATCHED = VARIANTS + (SSMAX,)  # attention implementations lssa_hf registers
ATTENTIONS = ("softmax",) + PATCHED  # "softmax": the checkpoint's own attention


@dataclass(frozen=True)
class LSSAConfig:
    """How a patched model computes attention.

    variant: "lssa" (softplus + length scaling), "lssar" (with re-weighting) or "ssmax" (the
        scaled-softmax baseline, ``lssa_hf.ssmax``).
    p: re-weighting power of LSSAR (paper default 15.0); ignored by "lssa" and "ssmax".
    backend: "auto" or a forced kernel path (see ``lssa_hf.attention.BACKENDS``).
    head_temperature: every attention module carries a learnable per-head multiplier of the length
        scale (``lssa_hf.temperature``); False is the paper's fixed scale.
    ssmax_length: "ssmax" only: the number of visible keys at which it equals softmax.
    softmax_layers: indices of layers that keep softmax attention (SDPA): a hybrid model.
    """

    variant: str = "lssar"
    p: float = DEFAULT_P
    backend: str = "auto"
    head_temperature: bool = False
    ssmax_length: int = 512
    softmax_layers: tuple = ()

    def __post_init__(self):
        from .attention import BACKENDS  # late import: attention imports kernels
        from .ssmax import check_length

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
        object.__setattr__(self, "head_temperature", bool(self.head_temperature))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "LSSAConfig":
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown LSSA settings {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}.")
        return cls(**values)

    @classmethod
    def of(cls, config) -> "LSSAConfig | None":
        """The settings stored on a transformers config, or None if it has none."""
        values = getattr(config, CONFIG_KEY, None)
        return None if values is None else cls.from_dict(values)
