"""The math (lssa_hf.lssa_attention, default dispatch) against the independent float64 reference."""

import math

import pytest
import torch

from lssa_hf import lssa_attention
from lssa_hf.functional import causal_mask
from reference import reference_attention


def tol(variant, p, dtype):
    """Max error allowed, relative to the largest reference value.

    fp32 rounding of the scores is amplified ~p times by the p-th power (measured: <= 1e-6 * p/2).
    """
    base = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    return base * (max(1.0, p / 10) if variant == "lssar" else 1.0)


def assert_matches(got, want, bound):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= bound * scale, f"max error {err:.3g} > {bound:.1g} x {scale:.3g}"


def inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, l: torch.randn(b, h, l, d, generator=g).to(dtype).requires_grad_()
    return make(hq, lq), make(hkv, lk), make(hkv, lk)


def check(q, k, v, mask, variant, p, dtype=torch.float32):
    out, _ = lssa_attention(q, k, v, mask, variant=variant, p=p)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + v.shape[-1:]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, mask=mask, variant=variant, p=p)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    bound = tol(variant, p, dtype)
    assert_matches(out, ref, bound)
    for g_, r_ in zip(grads, ref_grads):
        assert torch.isfinite(g_).all()
        assert_matches(g_, r_, bound * 4)


def padding_mask(b, lq, lk, pads):
    mask = causal_mask(lq, lk)[None, None].repeat(b, 1, 1, 1)
    for row, n in enumerate(pads):
        mask[row, :, :, :n] = False
    return mask


VARIANT_P = [("lssa", 15.0), ("lssar", 1.0), ("lssar", 3.0), ("lssar", 15.0), ("lssar", 40.0), ("lssar", 2.5)]


@pytest.mark.parametrize("variant,p", VARIANT_P)
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 37])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_causal_matches_reference(variant, p, length, heads):
    q, k, v = inputs(2, heads[0], heads[1], length, length, 16, seed=length)
    check(q, k, v, None, variant, p)


@pytest.mark.parametrize("variant,p", VARIANT_P)
def test_padding_window_decode_and_cross_masks(variant, p):
    q, k, v = inputs(3, 4, 2, 9, 9, 8)
    check(q, k, v, padding_mask(3, 9, 9, [0, 3, 9]), variant, p)  # last row fully masked
    check(q, k, v, causal_mask(9, 9, window=4)[None, None], variant, p)
    q1, k1, v1 = inputs(2, 4, 2, 1, 12, 8, seed=3)  # decode: one query, cached keys
    check(q1, k1, v1, None, variant, p)
    qc, kc, vc = inputs(2, 4, 4, 5, 7, 8, seed=4)  # cross attention, some keys padded
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    check(qc, kc, vc, mask, variant, p)


@pytest.mark.parametrize("variant,p", [("lssa", 15.0), ("lssar", 15.0)])
def test_long_sequence_matches_reference(variant, p):
    q, k, v = inputs(1, 2, 1, 1030, 1030, 32)
    check(q, k, v, None, variant, p)


def test_one_query_against_65536_keys_with_a_peaked_row():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 65536, 64, generator=g)
    v = torch.randn(1, 1, 65536, 64, generator=g)
    q = k[:, :, 1234:1235].clone()  # cosine 1 with one key: s = log(64) log(65536) ~ 46
    out, w = lssa_attention(q, k, v, torch.ones(1, 1, 1, 65536, dtype=torch.bool), variant="lssar", p=15.0,
                            return_weights=True)
    ref = reference_attention(q, k, v, torch.ones(1, 1, 1, 65536, dtype=torch.bool), variant="lssar", p=15.0)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert w[0, 0, 0].argmax() == 1234 and w[0, 0, 0, 1234] > 0.99
    assert_matches(out, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,p", [("lssa", 15.0), ("lssar", 15.0)])
def test_half_precision_inputs(dtype, variant, p):
    q, k, v = inputs(2, 4, 2, 40, 40, 16, dtype=dtype)
    check(q, k, v, padding_mask(2, 40, 40, [0, 7]), variant, p, dtype)


def test_float64_inputs_are_computed_in_float64():
    q, k, v = inputs(1, 2, 2, 20, 20, 8, dtype=torch.float64)
    check(q, k, v, None, "lssar", 40.0, torch.float64)


def test_nearly_uniform_rows_give_huge_but_exact_gradients():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = (base + 1e-4 * torch.randn(1, 1, 50, 16, generator=g, dtype=torch.float64)).requires_grad_()
    q = torch.randn(1, 1, 50, 16, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(1, 1, 50, 16, generator=g, dtype=torch.float64).requires_grad_()
    out, _ = lssa_attention(q, k, v, variant="lssar", p=15.0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_in = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attention(*ref_in, variant="lssar", p=15.0).sum(), ref_in)
    assert max(g_.abs().max().item() for g_ in grads) > 1e3  # the p / max(N*A - 1) blow-up is real
    for g_, r_ in zip(grads, ref_grads):
        assert torch.isfinite(g_).all()
        torch.testing.assert_close(g_, r_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_zero_query_and_key_rows_give_finite_gradients(dtype, variant):
    q, k, v = inputs(1, 2, 2, 6, 6, 8, dtype=dtype)
    with torch.no_grad():
        q[0, 0, 3].zero_()
        k[0, 1, 2].zero_()
    out, _ = lssa_attention(q, k, v, variant=variant)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g_).all() for g_ in grads)


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_fully_masked_rows_give_zeros_not_nan(variant):
    q, k, v = inputs(1, 2, 2, 4, 4, 8)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:, :3] = True
    out, w = lssa_attention(q, k, v, mask, variant=variant, return_weights=True)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w[:, :, 2:].sum(-1), torch.ones(1, 2, 2))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_weights_are_returned_normalised_and_masked():
    q, k, v = inputs(2, 2, 2, 6, 6, 8)
    out, w = lssa_attention(q, k, v, variant="lssar", p=15.0, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
    assert (w.masked_select(~causal_mask(6, 6)) == 0).all()
    torch.testing.assert_close(out, w @ v)


def test_dropout_acts_on_the_final_weights():
    torch.manual_seed(0)
    q, k, v = inputs(1, 4, 4, 64, 64, 8)
    _, w = lssa_attention(q, k, v, variant="lssa", return_weights=True)
    _, wd = lssa_attention(q, k, v, variant="lssa", dropout_p=0.5, return_weights=True)
    kept = wd != 0
    visible = causal_mask(64, 64).expand_as(w)
    frac = kept[visible].float().mean().item()
    assert 0.45 < frac < 0.55
    torch.testing.assert_close(wd[kept], 2 * w[kept])


@pytest.mark.parametrize("bad", [dict(variant="softmax"), dict(variant="lssar", p=0.0),
                                 dict(variant="lssar", p=-1.0), dict(variant="lssar", p=math.nan),
                                 dict(variant="lssar", p=math.inf), dict(backend="cuda-magic")])
def test_bad_settings_are_refused_with_the_fix(bad):
    q, k, v = inputs(1, 2, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="use one of|p > 0"):
        lssa_attention(q, k, v, **bad)


def test_bad_shapes_and_masks_are_refused():
    q, k, v = inputs(1, 3, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        lssa_attention(q, k, v)
    q, k, v = inputs(1, 2, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="4-D"):
        lssa_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="boolean"):
        lssa_attention(q, k, v, torch.zeros(1, 1, 3, 3))
