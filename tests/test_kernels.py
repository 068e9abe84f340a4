"""Exact kernels (blocked: pure-torch and native strips; flex) against the independent float64 reference.

Tolerances:
* float64: 1e-9 relative, i.e. the kernels are the same function up to rounding.
* float32: LSSA 2e-5 (softplus/exp/log rounding, ~10 ulp of the largest term). LSSAR raises
  (sp - mu) / scale to the power p, which multiplies the relative rounding of its base by p, so its
  tolerance is p * 2e-6 (4e-5 at p = 15, with a 1e-5 floor).
* bf16 / fp16 inputs: compared with the reference evaluated on the same rounded inputs; the output
  is rounded to the input dtype, so the tolerance is a few ulp of that dtype (bf16 2^-8, fp16 2^-11)
  times max|v|.
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from lssa_hf import attention
from lssa_hf.attention import choose_backend, lssa_attention
from lssa_hf.functional import materialized_attention
from lssa_hf.kernels import blocked, flex
from lssa_hf.kernels.blocked import blocked_attention
from reference import reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks' memory probe
from benchmarks.attention import peak_extra_bytes as _peak_extra_bytes  # noqa: E402


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _masks(kind, b, lq, lk):
    if kind is None:
        return None
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    if kind == "padding":  # left padding; row 0 of batch 0 sees nothing (fully masked rows)
        m = causal.expand(b, 1, lq, lk).clone()
        m[0, :, :, :6] = False
        return m
    if kind == "window":
        return causal & (torch.arange(lk)[None, :] > torch.arange(lk - lq, lk)[:, None] - 9)
    if kind == "packed":  # three documents packed in one row: block-diagonal causal
        doc = torch.arange(lk) * 3 // lk
        return (causal & (doc[None, :] == doc[lk - lq:][:, None]))[None, None]
    raise ValueError(kind)


def _run(fn, q, k, v, grads=True):
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = fn(q, k, v)
    if not grads:
        return out.detach(), None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return out.detach(), torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


def _assert_close(got, want, rtol, name=""):
    """max |got - want| <= rtol * max(max |want|, 1): relative for large values (huge gradients)."""
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"{name}: error {err:.3g} vs scale {scale:.3g}"


def _check(fn, q, k, v, mask, variant, p, rtol, grads=True):
    out, g = _run(fn, q, k, v, grads)
    ref, gr = _run(lambda a, b_, c: reference_attention(a, b_, c, mask, variant, p), q, k, v, grads)
    _assert_close(out, ref, rtol, "out")
    if grads:
        for name, x, y in zip("qkv", g, gr):
            _assert_close(x, y, rtol, "d" + name)
    return out


def _fp32_tol(variant, p):
    return 2e-5 if variant == "lssa" else max(1e-5, 2e-6 * p)


CASES = [  # (b, hq, hkv, lq, lk, mask kind)
    *[(2, 4, 2, n, n, None) for n in (1, 2, 3, 4, 5, 37, 300)],
    (2, 4, 2, 40, 40, "padding"),
    (1, 4, 4, 64, 64, "window"),
    (1, 2, 1, 60, 60, "packed"),
    (2, 4, 2, 1, 50, None),  # decode: one query, many keys
    (1, 2, 2, 9, 30, None),  # chunked prefill: queries aligned to the last keys
    (1, 2, 1, 1, 50, "padding"),
]


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}x{c[4]}-{c[5]}")
def test_blocked_float64_matches_reference(case, variant, impl):
    b, hq, hkv, lq, lk, kind = case
    q, k, v = _inputs(b, hq, hkv, lq, lk, 16)
    mask = _masks(kind, b, lq, lk)
    out = _check(lambda a, b_, c: blocked_attention(a, b_, c, mask, variant=variant, block_q=7, impl=impl),
                 q, k, v, mask, variant, 15.0, 1e-9)
    if kind == "padding":  # fully masked rows: exact zeros
        assert (out[0, :, :1] == 0).all() if lq == lk else True


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 15.0, 40.0])
def test_blocked_lssar_powers(p, impl):
    q, k, v = _inputs(2, 4, 2, 45, 45, 16)
    mask = _masks("padding", 2, 45, 45)
    _check(lambda a, b_, c: blocked_attention(a, b_, c, mask, variant="lssar", p=p, block_q=11, impl=impl),
           q, k, v, mask, "lssar", p, 1e-9)


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_blocked_float32_long(variant, impl):
    # L >= 1000 with the default strip sizing (several strips, ragged last one)
    q, k, v = _inputs(1, 2, 1, 1100, 1100, 32, torch.float32)
    _check(lambda a, b_, c: blocked_attention(a, b_, c, None, variant=variant, budget=1 << 18, impl=impl),
           q, k, v, None, variant, 15.0, _fp32_tol(variant, 15.0))


@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_blocked_half_precision(dtype, ulp, variant):
    q, k, v = _inputs(1, 4, 2, 100, 100, 32, dtype)
    mask = _masks("padding", 1, 100, 100)
    out, g = _run(lambda a, b_, c: blocked_attention(a, b_, c, mask, variant=variant, block_q=32), q, k, v)
    assert out.dtype == dtype and all(x.dtype == dtype for x in g)
    ref, gr = _run(lambda a, b_, c: reference_attention(a, b_, c, mask, variant), q, k, v)
    vmax = v.double().abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 4 * ulp * vmax
    for x, y in zip(g, gr):  # gradients: a few ulp of the largest gradient entry
        assert (x.double() - y).abs().max().item() <= 8 * ulp * y.abs().max().item()


def test_flex_cpu_inference_matches_reference():
    if not flex.available():
        pytest.skip("flex_attention unavailable")
    q, k, v = _inputs(1, 4, 2, 256, 256, 16, torch.float32)
    assert flex.supports(q, k, None, variant="lssa", p=15.0, grad=False)
    assert not flex.supports(q, k, None, variant="lssar", p=15.0, grad=False)  # needs lse: not on CPU
    assert not flex.supports(q, k, None, variant="lssa", p=15.0, grad=True)  # no CPU backward
    with torch.no_grad():
        out = flex.flex_lssa(q, k, v, None, variant="lssa")
    _assert_close(out, reference_attention(q, k, v, None, "lssa"), 2e-5, "flex")


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_paths_agree(variant):
    q, k, v = _inputs(2, 4, 2, 96, 96, 32, torch.float32)
    mask = _masks("padding", 2, 96, 96)
    outs = {}
    for backend in ("materialized", "blocked", "native", "flex"):
        with torch.no_grad():
            outs[backend] = lssa_attention(q, k, v, mask, variant=variant, backend=backend)[0]
    for backend, out in outs.items():
        _assert_close(out, outs["materialized"], _fp32_tol(variant, 15.0), backend)


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_one_query_65536_keys_peaked(variant, impl):
    q, k, v = _inputs(1, 1, 1, 1, 65536, 64, torch.float32)
    q = k[:, :, 12345:12346].clone()  # cosine 1 with one key: a sharply peaked row
    out = _check(lambda a, b_, c: blocked_attention(a, b_, c, None, variant=variant, impl=impl), q, k, v, None,
                 variant, 15.0, _fp32_tol(variant, 15.0) * 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_near_uniform_rows_huge_finite_gradients(impl):
    # keys almost identical: N*A - 1 ~ 1e-7, LSSAR gradients ~ p / max(N*A - 1) are huge but finite
    q, k, v = _inputs(1, 2, 2, 24, 24, 16)
    k = k[:, :, :1] + 1e-7 * k
    out, g = _run(lambda a, b_, c: blocked_attention(a, b_, c, None, variant="lssar", block_q=5, impl=impl), q, k, v)
    ref, gr = _run(lambda a, b_, c: reference_attention(a, b_, c, None, "lssar"), q, k, v)
    assert max(x.abs().max().item() for x in gr[:2]) > 1e4
    _assert_close(out, ref, 1e-6, "out")
    for name, x, y in zip("qkv", g, gr):
        _assert_close(x, y, 1e-5, "d" + name)


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zero_rows_finite_gradients(variant, dtype, impl):
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, dtype)
    q[:, :, 3] = 0
    k[:, :, 5] = 0
    q[:, 1] = 0  # a whole head of zero queries: every row exactly uniform (LSSAR falls back to A)
    out, g = _run(lambda a, b_, c: blocked_attention(a, b_, c, None, variant=variant, block_q=6, impl=impl), q, k, v)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in g)
    ref = reference_attention(q, k, v, None, "lssa")  # zero query: uniform weights in both variants
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2  # half outputs round to ~1e-3
    _assert_close(out[:, 1], ref[:, 1], tol, "uniform rows")


@pytest.mark.parametrize("backend", ["blocked", "native"])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_auto_uses_memory_efficient_path_above_threshold(variant, backend, monkeypatch):
    monkeypatch.delenv("LSSA_BACKEND", raising=False)
    monkeypatch.setattr(attention, "MATERIALIZE_MAX_ELEMENTS", 1 << 20)
    monkeypatch.setattr(blocked, "DEFAULT_BUDGET", 1 << 18)
    b, h, L = 1, 2, 3072  # B*H*L*L = 18M score elements, 18x the threshold
    q, k, v = (t.requires_grad_() for t in _inputs(b, h, h, L, L, 16, torch.float32))
    assert choose_backend(q, k, needs_weights=False, dropout_p=0.0, variant=variant) == "native"

    def step():
        out, weights = lssa_attention(q, k, v, None, variant=variant, backend=backend)
        out.sum().backward()
        assert weights is None

    step()  # warm (plan cache, build)
    # a few strips (~budget elements each; the pure-torch LSSAR backward chain holds ~20) and the
    # inputs' size of gradients, never B*H*L*L scores
    strips = 10 if backend == "native" else 24
    peak = _peak_extra_bytes(step)
    assert peak <= strips * 4 * (1 << 18) + 12 * q.numel() * 4 and peak < b * h * L * L * 4 // 3, peak


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("LSSA_BACKEND", raising=False)
    small = torch.zeros(1, 2, 16, 8)
    big = torch.zeros(1, 8, 1024, 64)
    assert choose_backend(small, small, needs_weights=False, dropout_p=0.0) == "materialized"
    assert choose_backend(big, big, needs_weights=True, dropout_p=0.0) == "materialized"
    assert choose_backend(big, big, needs_weights=False, dropout_p=0.1) == "materialized"
    assert choose_backend(big, big, needs_weights=False, dropout_p=0.0) == "native"  # CPU
    # weights requested from a kernel backend: served by the materialised path
    out, w = lssa_attention(small, small, small, backend="blocked", return_weights=True)
    assert w is not None and w.shape == (1, 2, 16, 16)
    # forcing flex where it cannot run (CPU backward) falls back to the blocked kernel
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    out, _ = lssa_attention(q, q, q, backend="flex", variant="lssar")
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    monkeypatch.setenv("LSSA_BACKEND", "nope")
    with pytest.raises(ValueError, match="Unknown LSSA backend"):
        lssa_attention(small, small, small)


def test_forced_backend_env(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 33, 33, 8, torch.float32)
    monkeypatch.setenv("LSSA_BACKEND", "blocked")
    out = lssa_attention(q, k, v, variant="lssar")[0]
    monkeypatch.setenv("LSSA_BACKEND", "materialized")
    ref = lssa_attention(q, k, v, variant="lssar")[0]
    _assert_close(out, ref, 4e-5)


def test_mask_plan_cache_follows_the_mask():
    q, k, v = _inputs(1, 2, 2, 30, 30, 8)
    mask = _masks("padding", 1, 30, 30)
    first = blocked_attention(q, k, v, mask, block_q=8)
    _assert_close(blocked_attention(q, k, v, mask, block_q=8), first, 0.0)  # cached plan: same result
    mask[..., 6:12] = False  # in place: the cache must notice
    _assert_close(blocked_attention(q, k, v, mask, block_q=8), reference_attention(q, k, v, mask), 1e-9)
    with torch.inference_mode():  # inference tensors have no version counter: no caching, still exact
        m2 = _masks("window", 1, 30, 30).clone()
        _assert_close(blocked_attention(q, k, v, m2), reference_attention(q, k, v, m2), 1e-9)


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
@pytest.mark.parametrize("backend", ["materialized", "blocked", "native"])
@pytest.mark.parametrize("kind", [None, "padding", "packed"])
def test_per_head_temperature_matches_reference_with_its_gradient(backend, variant, kind):
    """A learned per-head temperature tau_h scales head h's length scale: output and the gradients
    of q, k, v and tau equal the float64 reference (block size 7 does not divide L)."""
    q, k, v = _inputs(2, 4, 2, 45, 45, 16)
    mask = _masks(kind, 2, 45, 45)
    tau = torch.tensor([0.5, 1.0, 2.0, 3.5], dtype=torch.float64)
    dout = torch.randn(2, 4, 45, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, tau)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    if backend == "blocked":
        ours = run(lambda a, b_, c, t: blocked_attention(a, b_, c, mask, variant=variant, block_q=7, temperature=t))
    else:
        ours = run(lambda a, b_, c, t: lssa_attention(a, b_, c, mask, variant=variant, backend=backend,
                                                      temperature=t)[0])
    want = run(lambda a, b_, c, t: reference_attention(a, b_, c, mask, variant, 15.0, temperature=t))
    for name, x, y in zip(("out", "dq", "dk", "dv", "dtau"), ours, want):
        _assert_close(x, y, 1e-8, name)
    assert want[-1].abs().min() > 0  # the temperature gradient is not trivially zero


def test_temperature_of_ones_is_the_paper_and_bad_shapes_are_refused():
    q, k, v = _inputs(1, 4, 2, 20, 20, 8, torch.float32)
    plain = lssa_attention(q, k, v, variant="lssar")[0]
    ones = lssa_attention(q, k, v, variant="lssar", temperature=torch.ones(4))[0]
    assert torch.equal(plain, ones)
    with pytest.raises(ValueError, match="one value per query head"):
        lssa_attention(q, k, v, temperature=torch.ones(2))
