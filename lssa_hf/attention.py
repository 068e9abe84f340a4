"""Entry point of the math: one function, several exact backends. Pure torch.

``lssa_attention`` picks the backend; every backend computes the same function (the definition
lives in ``functional.py``) and is tested against the same float64 reference.
"""

from __future__ import annotations

import os

import torch

from .functional import DEFAULT_P, check_settings, check_shapes, materialized_attention

BACKENDS = ("auto", "materialized")
BACKEND_ENV = "LSSA_BACKEND"  # force a backend for every call, e.g. LSSA_BACKEND=materialized


def choose_backend(query: torch.Tensor, key: torch.Tensor, *, needs_weights: bool, dropout_p: float) -> str:
    """Pick the fastest exact backend for these inputs."""
    return "materialized"


def lssa_attention(query, key, value, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P,
                   dropout_p: float = 0.0, return_weights: bool = False, backend: str = "auto"):
    """LSSA / LSSAR attention.

    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D); ``mask`` bool broadcastable to (B, Hq, Lq, Lk),
    True = visible, or None for causal with queries aligned to the last keys. Returns
    (output (B, Hq, Lq, Dv) in the input dtype, weights (B, Hq, Lq, Lk) or None).
    """
    check_settings(variant, p)
    check_shapes(query, key, value)
    backend = os.environ.get(BACKEND_ENV, backend)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown LSSA backend {backend!r}: use one of {BACKENDS}.")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True = visible), got {mask.dtype}.")
    if backend == "auto":
        backend = choose_backend(query, key, needs_weights=return_weights, dropout_p=dropout_p)
    return materialized_attention(query, key, value, mask, variant=variant, p=p,
                                  dropout_p=dropout_p, return_weights=return_weights)
