"""The strip kernels as ``torch.library`` custom ops: one op per pass, autograd and fake tensors.

``torch.compile(model, fullgraph=True)`` sees ``lssa_hf::strips_fwd`` / ``strips_bwd`` (and
``visible_counts`` for an explicit mask) as opaque ops whose output shapes follow symbolically from
their inputs, so a patched model traces without graph breaks and one dynamic graph serves every
sequence length. The strip plan and the strip loop run inside the ops, in C++ (``native.py``, CPU
float32/float64) or in pure torch (``blocked.py``, any device).

``impl`` (a string argument, so it is part of the traced call): "native" runs the C++ strips where
they run and the pure-torch ones elsewhere (including when the build is unavailable: logged once);
"torch" always runs the pure-torch ones. ``native.calls`` counts which one ran.

Eager calls (not under ``torch.compile``) skip the dispatcher: ``strips`` runs the same functions
through a plain ``autograd.Function``. The custom-op machinery imports ``torch._dynamo`` on its first
call (1.5 s), which a process that never compiles should not pay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import as_4d
from . import blocked, native

IMPLS = ("torch", "native")


def _prepare(qs, k, mask, block_q, budget):
    """The 4-D mask view (unit last stride, for the C++ strips) and the (cached) strip plan."""
    b, hq, lq, _ = qs.shape
    lk = k.shape[2]
    mask4 = None if mask is None else as_4d(mask, lq, lk)
    _, plan = blocked._cached_plan(mask, mask4, b, hq, lq, lk, block_q, budget, qs.device)
    if mask4 is not None and mask4.stride(-1) != 1:
        mask4 = mask4.contiguous()
    return mask4, plan


def _native(qs, impl):
    """The C++ module to run these strips with, or None for the pure-torch strips."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown strip implementation {impl!r}: use one of {IMPLS}.")
    mod = native.module() if impl == "native" and native.runs(qs) else None
    native.calls[native.isa() if mod is not None else "torch"] += 1
    return mod


def _plan_tensor(plan):
    return torch.tensor(plan, dtype=torch.long).view(-1, 5)


def _visible_counts(mask: Tensor, b: int, hq: int, lq: int, lk: int, block_q: int | None, budget: int) -> Tensor:
    """N_i (int32, (Bm, Hm, Lq)) of a bool mask; cached with the plan for the very same mask."""
    mask4 = as_4d(mask, lq, lk)
    n, _ = blocked._cached_plan(mask, mask4, b, hq, lq, lk, block_q, budget, mask.device)
    return n.to(torch.int32, copy=True)


visible_counts = torch.library.custom_op("lssa_hf::visible_counts", _visible_counts, mutates_args=())


@visible_counts.register_fake
def _(mask, b, hq, lq, lk, block_q, budget):
    dims = mask.dim()
    bm = mask.shape[0] if dims == 4 else 1
    hm = mask.shape[-3] if dims >= 3 else 1
    return mask.new_empty((bm, hm, lq), dtype=torch.int32)


def _strips_fwd(qs: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, n: Tensor, variant: str, p: float,
               floor: float, block_q: int | None, budget: int, impl: str) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv), row statistics for backward) of LSSA/LSSAR on scaled unit q and unit k;
    ``floor`` (``functional.grad_floor``, 0 = exact) bounds the re-weighting gradient in backward."""
    mask4, plan = _prepare(qs, k, mask, block_q, budget)
    mod = _native(qs, impl)
    if mod is None:
        def run(shift):
            return blocked.forward_strips(qs, k, v, mask4, n, variant, p, plan, shift)
    else:
        b, hq, lq, _ = qs.shape
        hkv = k.shape[1]
        alpha = blocked.alpha_rows(n, b, hkv, hq // hkv, lq, qs.dtype)
        tie = blocked.tie_rows(n, b, hkv, hq // hkv, lq, qs.dtype)
        plan_t = _plan_tensor(plan)

        def run(shift):
            return mod.forward(qs, k, v, mask4, alpha, tie, plan_t, variant == "lssar", p,
                               native.Q_BLOCK, native.K_BLOCK, shift)
    out, stats = run(None)
    # rows whose scores all underflow softplus: rerun with their shifts (rare: tau log(d) log(N) > 45)
    flagged = blocked.flagged_rows(stats, n, variant)
    shift = None
    if bool(flagged.any()):
        shift = blocked.underflow_shifts(qs, k, flagged, blocked.mask_visibility(mask4, qs.shape[2], k.shape[2]))
    if shift is None:
        shift = stats.new_zeros(stats.shape[1:])
    else:
        out, stats = run(shift)
    return out, torch.cat([stats, shift[None]])  # the shifts travel to backward as a last statistic


strips_fwd = torch.library.custom_op("lssa_hf::strips_fwd", _strips_fwd, mutates_args=())


@strips_fwd.register_fake
def _(qs, k, v, mask, n, variant, p, floor, block_q, budget, impl):
    b, hq, lq, _ = qs.shape
    hkv = k.shape[1]
    nstat = 2 if variant == "lssa" else 5  # + the underflow shifts
    return qs.new_empty((b, hq, lq, v.shape[-1])), qs.new_empty((nstat, b, hkv, hq // hkv, lq))


def _strips_bwd(dout: Tensor, qs: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, mask: Tensor | None,
               n: Tensor, variant: str, p: float, floor: float, block_q: int | None, budget: int,
               impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dqs, dk, dv) of ``strips_fwd``, recomputing each strip."""
    mask4, plan = _prepare(qs, k, mask, block_q, budget)
    mod = _native(qs, impl)
    dout = dout.to(qs.dtype).contiguous()
    stats, shift = stats[:-1], stats[-1]
    shift = shift.contiguous() if bool((shift < 0).any()) else None
    if mod is None:
        return blocked.backward_strips(dout, qs, k, v, out, stats, mask4, n, variant, p, plan, floor, shift)
    b, hq, lq, _ = qs.shape
    hkv = k.shape[1]
    alpha = blocked.alpha_rows(n, b, hkv, hq // hkv, lq, qs.dtype)
    dq, dk, dv = mod.backward(dout, qs, k, v, out, stats.contiguous(), mask4, alpha, _plan_tensor(plan),
                              variant == "lssar", p, floor, native.Q_BLOCK, native.K_BLOCK, shift)
    return dq, dk, dv


strips_bwd = torch.library.custom_op("lssa_hf::strips_bwd", _strips_bwd, mutates_args=())


@strips_bwd.register_fake
def _(dout, qs, k, v, out, stats, mask, n, variant, p, floor, block_q, budget, impl):
    return torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    qs, k, v, mask, n, variant, p, floor, block_q, budget, impl = inputs
    ctx.save_for_backward(qs, k, v, output[0], output[1], n, *([] if mask is None else [mask]))
    ctx.args = (variant, p, floor, block_q, budget, impl)


def _backward(ctx, dout, _dstats, bwd=None):
    qs, k, v, out, stats, n, *mask = ctx.saved_tensors
    dq, dk, dv = (bwd or strips_bwd)(dout, qs, k, v, out, stats, mask[0] if mask else None, n, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("lssa_hf::strips_fwd", _backward, setup_context=_setup_context)


class _EagerStrips(torch.autograd.Function):
    """``strips_fwd`` / ``strips_bwd`` without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, stats = _strips_fwd(*inputs)
        _setup_context(ctx, inputs, (out, stats))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _backward(ctx, dout, None, bwd=_strips_bwd)


def counts(mask: Tensor, b: int, hq: int, lq: int, lk: int, block_q: int | None, budget: int) -> Tensor:
    """N_i of a bool mask: the custom op under torch.compile, the function itself in eager mode."""
    if torch.compiler.is_compiling():
        return torch.ops.lssa_hf.visible_counts(mask, b, hq, lq, lk, block_q, budget)
    return _visible_counts(mask, b, hq, lq, lk, block_q, budget)


def strips(qs, k, v, mask, n, variant: str, p: float, floor: float, block_q, budget: int, impl: str) -> Tensor:
    """LSSA/LSSAR output of the strip kernels (differentiable): the custom op under torch.compile,
    ``_EagerStrips`` in eager mode (same functions, same results)."""
    if torch.compiler.is_compiling():
        return torch.ops.lssa_hf.strips_fwd(qs, k, v, mask, n, variant, p, floor, block_q, budget, impl)[0]
    return _EagerStrips.apply(qs, k, v, mask, n, variant, p, floor, block_q, budget, impl)
