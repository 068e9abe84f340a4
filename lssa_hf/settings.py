"""User-facing settings of the LSSA backends, stored on a model's config as ``config.lssa``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .functional import DEFAULT_P, check_settings

CONFIG_KEY = "lssa"


@dataclass(frozen=True)
class LSSAConfig:
    """How a patched model computes attention.

    variant: "lssa" (softplus + length scaling) or "lssar" (with re-weighting).
    p: re-weighting power of LSSAR (paper default 15.0); ignored by "lssa".
    backend: "auto" or a forced kernel path (see ``lssa_hf.attention.BACKENDS``).
    head_temperature: every attention module carries a learnable per-head multiplier of the length
        scale (``lssa_hf.temperature``); False is the paper's fixed scale.
    """

    variant: str = "lssar"
    p: float = DEFAULT_P
    backend: str = "auto"
    head_temperature: bool = False

    def __post_init__(self):
        from .attention import BACKENDS  # late import: attention imports kernels

        check_settings(self.variant, self.p)
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown LSSA backend {self.backend!r}: use one of {BACKENDS}.")
        object.__setattr__(self, "p", float(self.p))
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
