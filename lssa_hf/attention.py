"""Entry point of the math: one function, several exact backends. Pure torch.

``lssa_attention`` picks the backend; every backend computes the same function (the definition
lives in ``functional.py``) and is tested against the same float64 reference.

Backends (force one with ``backend=``, or for every call whose ``backend`` is "auto" with the
environment variable ``LSSA_BACKEND``; an explicit argument wins over the environment):

* ``materialized``: full (B, H, Lq, Lk) weights. Small inputs, ``return_weights=True``, dropout.
* ``blocked``: exact query-strip kernel with recompute in backward (``kernels/blocked.py``); memory
  linear in L on every device. Dropout is not implemented there: ``dropout_p > 0`` always runs
  ``materialized``, which is only affordable for short sequences.
* ``blocked_compiled``: the same kernel with its per-strip elementwise chains fused by
  torch.compile (``kernels/compiled.py``) and, on AVX-512 CPUs, the LSSA forward pass in a native
  C++ kernel (``kernels/native.py``); falls back to ``blocked`` maths if inductor cannot build.
  ``LSSA_COMPILE=0`` disables compilation everywhere, ``LSSA_NATIVE=0`` the native kernel.
* ``flex``: ``torch.nn.attention.flex_attention`` (``kernels/flex.py``); used where it is valid
  (see ``flex.supports``), otherwise the call runs ``blocked`` instead.

``auto`` (default): materialized up to ``MATERIALIZE_MAX_ELEMENTS`` score elements (B*Hq*Lq*Lk)
or when weights/dropout are requested; above, on CUDA flex where valid else blocked; on CPU
blocked_compiled (flex was measured slower on CPU), or blocked when compilation is disabled.
"""

from __future__ import annotations

import torch

from .functional import _materialized, check_mask, check_shapes
from .kernels import blocked, compiled, flex
from .settings import BACKEND_ENV, BACKENDS, DEFAULT_P, check_settings, resolve_backend  # noqa: F401

# Score elements (B*Hq*Lq*Lk) up to which the materialised path is used: below this it is as
# fast as the kernels on CPU and its (B, H, Lq, Lk) temporaries stay small (8 MiB per fp32 copy).
MATERIALIZE_MAX_ELEMENTS = 1 << 21


def choose_backend(query: torch.Tensor, key: torch.Tensor, *, needs_weights: bool, dropout_p: float,
                   variant: str = "lssa", grad: bool | None = None, mask=None, p: float = DEFAULT_P) -> str:
    """Pick the fastest exact backend for these inputs."""
    if grad is None:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return _backend_for("auto", query, key, mask, variant, p, grad, needs_weights, dropout_p)


def _backend_for(backend, query, key, mask, variant, p, grad, needs_weights, dropout_p) -> str:
    """The backend that runs this call: ``backend`` as resolved (argument > LSSA_BACKEND > auto),
    made valid for it; ``flex.supports`` is asked at most once."""
    if needs_weights or dropout_p > 0.0:
        return "materialized"  # only the materialised path has weights and dropout
    if backend == "auto":
        b, hq, lq, _ = query.shape
        if b * hq * lq * key.shape[-2] <= MATERIALIZE_MAX_ELEMENTS:
            return "materialized"
        backend = "flex" if query.device.type == "cuda" else None
    if backend == "flex" and flex.supports(query, key, mask, variant=variant, p=p, grad=grad):
        return "flex"
    if backend in (None, "flex"):  # auto without flex, or flex where it cannot run
        return "blocked_compiled" if query.device.type == "cpu" and compiled.enabled() else "blocked"
    return backend


def lssa_attention(query, key, value, mask=None, *, variant: str = "lssa", p: float = DEFAULT_P,
                   dropout_p: float = 0.0, return_weights: bool = False, backend: str = "auto",
                   temperature=None):
    """LSSA / LSSAR attention.

    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D); ``mask`` bool broadcastable to (B, Hq, Lq, Lk),
    True = visible, or None for causal with queries aligned to the last keys. ``temperature``: None
    (the paper) or Hq per-head multipliers tau_h of the length scale, s = tau_h log(d) log(N_i) cos;
    it may require grad (a learned temperature). ``backend``: see the module docstring. Returns
    (output (B, Hq, Lq, Dv) in the input dtype, weights (B, Hq, Lq, Lk) or None).
    """
    check_settings(variant, p)
    check_shapes(query, key, value)
    backend = resolve_backend(backend)
    check_mask(mask, query, key)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, temperature)
                                           if t is not None)
    backend = _backend_for(backend, query, key, mask, variant, p, grad, return_weights, dropout_p)
    if backend == "materialized":
        return _materialized(query, key, value, mask, variant, p, dropout_p, return_weights, temperature)
    if backend == "flex":
        return flex.run(query, key, value, mask, variant=variant, p=p, temperature=temperature, grad=grad), None
    ops = compiled.compiled_ops() if backend == "blocked_compiled" else None
    return blocked.blocked_attention(query, key, value, mask, variant=variant, p=p, ops=ops,
                                     temperature=temperature), None
