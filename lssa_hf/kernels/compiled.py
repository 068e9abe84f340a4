"""Fused per-strip elementwise math for the blocked kernel, via torch.compile (inductor).

The blocked kernel's time outside its matmuls is a chain of elementwise passes over each strip
(softplus, sums, max, powers, sigmoid). Inductor fuses each chain into one or two vectorised loops.
The functions compiled are exactly ``blocked.EAGER_OPS``, so the maths cannot drift; in fp32 they
replace log1p by a polynomial (``blocked._log1p``, exact to fp32 rounding). LSSA's forward pass uses
the native AVX-512 kernel instead where it runs (``native.py``).

Compilation is lazy (first call), shape-dynamic (strip heights and widths vary; one graph serves all)
and guarded: if inductor cannot build here (no compiler, unsupported platform) the eager functions
are used. Past torch's recompile limit dynamo silently runs the eager functions, which are the same
maths, so the result stays exact - only slower. ``recompiles()`` reports the count for checks.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import blocked, native

logger = logging.getLogger(__name__)

COMPILE_ENV = "LSSA_COMPILE"  # "0" disables the compiled strips (eager ops everywhere)
_compiled: dict = {}
_broken: set = set()


def enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0" and hasattr(torch, "compile")


def _wrap(fn):
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args):
        if name in _broken:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as err:  # inductor unavailable here: stay correct, run eager
            logger.warning("LSSA: compiling %s failed (%s); using eager strips.", name, err)
            _broken.add(name)
            return fn(*args)

    return call


def compiled_ops() -> dict:
    """The per-strip ops, compiled (``blocked.EAGER_OPS`` when compilation is disabled)."""
    if not enabled():
        return blocked.EAGER_OPS
    if not _compiled:
        _compiled.update({name: _wrap(fn) for name, fn in blocked.EAGER_OPS.items() if name != "fwd_lssa"})
        # LSSA forward: the native kernel where it runs, else only the in-place softplus is compiled
        # (see ``blocked.fwd_lssa``)
        _compiled["fwd_lssa"] = native.lssa_forward(
            functools.partial(blocked.fwd_lssa, softplus=_wrap(blocked.softplus_)))
    return _compiled


def working() -> bool:
    """Whether no compiled op has fallen back to eager after a failed build."""
    return enabled() and not _broken


def recompiles() -> int:
    """Dynamo recompilations so far in this process (all frames): a health check for the cache."""
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["recompiles"].values()))
    except Exception:
        return 0
