"""Entry point of the math: one function, several exact backends. Pure torch.

``lssa_attention`` picks the backend; every backend computes the same function (the definition
lives in ``functional.py``) and is tested against the same float64 reference.

Backends (force one with ``backend=``, or for every call whose ``backend`` is "auto" with the
environment variable ``LSSA_BACKEND``; an explicit argument wins over the environment):

* ``materialized``: full (B, H, Lq, Lk) weights. Small inputs, ``return_weights=True``, dropout.
* ``blocked``: exact query-strip kernel with recompute in backward (``kernels/blocked.py``); memory
  linear in L on every device. Dropout is not implemented there: ``dropout_p > 0`` always runs
  ``materialized``, which is only affordable for short sequences.
* ``native``: the same strips in C++ for this CPU (``kernels/native.py``: AVX-512, AVX2, NEON),
  all four passes, built on first use; the pure-torch strips where it cannot run (another device or
  dtype, no compiler: logged). ``LSSA_NATIVE=0`` disables it. ``blocked_compiled`` is its former
  name (the torch.compile'd strips it replaced) and still accepted.
  Both strip backends are ``torch.library`` custom ops (``kernels/ops.py``): ``torch.compile`` of a
  patched model traces them without graph breaks.
* ``flex``: ``torch.nn.attention.flex_attention`` (``kernels/flex.py``); used where it is valid
  (see ``flex.supports``), otherwise the call runs ``blocked`` instead.
* ``triton``: Triton kernels (``kernels/triton_lssa.py``), forward and backward, fp32/fp16/bf16;
  CUDA, or CPU under Triton's interpreter (``TRITON_INTERPRET=1``, tests). Forcing it where it
  cannot run (no triton, CPU without the interpreter, fp64) raises an error that names the fix.

``auto`` (default): materialized up to ``MATERIALIZE_MAX_ELEMENTS`` score elements (B*Hq*Lq*Lk)
or when weights/dropout are requested; above, on CUDA triton when it is installed (flex where
valid otherwise, then blocked; triton is the CUDA default unmeasured against flex: no GPU was lent to
measure it, ``benchmarks/gpu_check.py`` does); on CPU native (flex was measured slower on CPU).
"""

from __future__ import annotations

import torch

from .functional import _materialized, check_mask, check_shapes
from .kernels import blocked, flex, triton_lssa
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
        if query.device.type == "cuda" and triton_lssa.supports(query):
            return "triton"
        backend = "flex" if query.device.type == "cuda" else None
    if backend == "flex" and flex.supports(query, key, mask, variant=variant, p=p, grad=grad):
        return "flex"
    if backend in (None, "flex"):  # auto without flex, or flex where it cannot run
        return "native" if query.device.type == "cpu" else "blocked"
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
    if backend == "triton":
        return triton_lssa.triton_attention(query, key, value, mask, variant=variant, p=p,
                                            temperature=temperature), None
    if backend == "flex":
        return flex.run(query, key, value, mask, variant=variant, p=p, temperature=temperature, grad=grad), None
    impl = "torch" if backend == "blocked" else "native"  # native, blocked_compiled (its former name)
    return blocked.blocked_attention(query, key, value, mask, variant=variant, p=p, impl=impl,
                                     temperature=temperature), None
