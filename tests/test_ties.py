"""Near ties: re-weighted mass that is only rounding counts as zero on every backend, and half-precision
gradients stay finite for every p (``functional.tie_tolerance``, ``functional.grad_floor``).

The float64 reference keeps the plain formula; exactly tied rows are checked against their exact
answer instead (all keys identical: every weighting is uniform, so the output is the mean of the
visible values).
"""

import math

import pytest
import torch

from lssa_hf.attention import lssa_attention
from lssa_hf.functional import causal_mask, softplus_scores, tie_tolerance
from lssa_hf.kernels import blocked, triton_lssa
from reference import reference_attention

TRITON = triton_lssa.available()
# flex runs blocked where it cannot; triton runs under its interpreter on CPU
BACKENDS = ["materialized", "blocked", "native", "flex", *(["triton"] if TRITON else [])]
GRAD_BACKENDS = ["materialized", "blocked", "native", *(["triton"] if TRITON else [])]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def tied_inputs(b, hq, hkv, lq, lk, d, dtype, seed=0, query_scale=10.0):
    """Random queries (norms up to ``query_scale``), every key of a head identical."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * torch.rand(b, hq, lq, 1, generator=g,
                                                                                   dtype=torch.float64) * query_scale
    k = (torch.randn(b, hkv, 1, d, generator=g, dtype=torch.float64) * 3).expand(b, hkv, lk, d)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype).contiguous(), v.to(dtype)


def mean_of_visible(v, mask, hq):
    """Uniform weights over the visible keys, float64, (B, Hq, Lq, Dv); zero rows where nothing is visible."""
    b, hkv, lk, _ = v.shape
    w = mask.double().expand(b, hq, -1, lk)
    w = w / w.sum(-1, keepdim=True).clamp_min(1)
    return w @ v.double().repeat_interleave(hq // hkv, 1)


MASKS = {
    "causal": lambda lq, lk: causal_mask(lq, lk),
    "window": lambda lq, lk: causal_mask(lq, lk, window=7),
    "padding": lambda lq, lk: torch.cat([torch.zeros(lq, 5, dtype=torch.bool), causal_mask(lq, lk)[:, 5:]], 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("p", [0.5, 1.0, 15.0, 50.0])
def test_exactly_tied_rows_take_the_lssa_fallback_on_every_backend(backend, dtype, mask_kind, p):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in float32")
    q, k, v = tied_inputs(2, 4, 2, 40, 40, 32, dtype, seed=int(p))
    mask = MASKS[mask_kind](40, 40)
    with torch.no_grad():
        out = lssa_attention(q, k, v, mask, variant="lssar", p=p, backend=backend)[0]
    want = mean_of_visible(v, mask, 4)
    ulp = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    err = (out.double() - want).abs().max().item()
    # a sharp distribution over arbitrary keys would be off by O(max |v|) ~ 3
    assert err <= 4 * ulp * v.double().abs().max().item(), err


@pytest.mark.parametrize("d", [8, 64, 256])
@pytest.mark.parametrize("n", [4, 5, 9, 40, 1000])
def test_rounding_of_tied_rows_stays_well_inside_the_tolerance(d, n):
    """The measured |N*A - 1| of exactly tied fp32 rows (the rounding the tolerance must absorb)."""
    q, k, _ = tied_inputs(1, 4, 2, n, n, d, torch.float32, seed=d + n)
    sp, cnt, visible = softplus_scores(q, k, causal_mask(n, n))
    t = (cnt * sp / sp.sum(-1, keepdim=True) - 1).where(visible, 0.0).abs().amax(-1, keepdim=True)
    rows = cnt > 3
    assert (t[rows] <= tie_tolerance(cnt, torch.float32)[rows] / 4).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_level_mass_is_no_mass_on_every_backend(backend):
    """Keys equal up to one fp32 ulp: max N*A - 1 is rounding-sized (below the tolerance), so every
    LSSAR row takes the LSSA fallback on every backend; treating that mass as real would re-weight
    towards whichever keys rounded up (an O(|v|) change)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 40, 32, generator=g) * 5
    k = torch.randn(1, 2, 1, 32, generator=g) * (1 + 2e-7 * torch.randn(1, 2, 40, 32, generator=g))
    v = torch.randn(1, 2, 40, 32, generator=g)
    t = (lambda sp, n, vis: (n * sp / sp.sum(-1, keepdim=True) - 1).where(vis & (n > 3), 0.0))(
        *softplus_scores(q.double(), k.double(), causal_mask(40, 40)))
    assert 0 < t.max().item() < tie_tolerance(torch.tensor(4.0), torch.float32).item()  # rounding-sized mass
    with torch.no_grad():
        lssar = lssa_attention(q, k, v, variant="lssar", p=15.0, backend=backend)[0]
        lssa = lssa_attention(q, k, v, variant="lssa", backend=backend)[0]
    assert (lssar - lssa).abs().max().item() < 1e-5


def test_the_tolerance_keeps_real_mass():
    """float64 rows whose mass is 1e-7 (far above float64 rounding) still re-weight, exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k = k[:, :, :1] + 1e-7 * k  # nearly tied: N*A - 1 ~ 1e-7
    want = reference_attention(q, k, v, None, "lssar")
    for backend in ("materialized", "blocked", "native"):  # float64 (triton computes in float32)
        out = lssa_attention(q, k, v, variant="lssar", backend=backend)[0]
        assert (out - want).abs().max().item() < 1e-6
    assert (want - mean_of_visible(v, causal_mask(24, 24), 2)).abs().max().item() > 1e-2  # not the fallback


def _grads(backend, q, k, v, p, dout, mask=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = lssa_attention(*leaves, mask, variant="lssar", p=p, backend=backend)[0]
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def near_the_threshold(q, k, mask=None):
    """Whether any row's largest N*A - 1 (float64, on these rounded inputs) is within 8x of the tie
    tolerance: there the fallback decision may differ between backends by rounding."""
    lq, lk = q.shape[-2], k.shape[-2]
    mask = causal_mask(lq, lk) if mask is None else mask
    sp, n, visible = softplus_scores(q.double(), k.double(), mask)
    t = (n * sp / sp.sum(-1, keepdim=True).clamp_min(1e-300) - 1).where(visible, -1.0).amax(-1, keepdim=True)
    tol = tie_tolerance(n, torch.float32)
    return bool(((n > 3) & (t > tol / 8) & (t < 8 * tol)).any())


def near_the_mean(q, k, p, mask=None):
    """Whether p < 1 and, in a row that re-weights (not a tied fallback row), some visible key's
    softplus score is within float32 rounding of the row mean m (8 N eps m: the rounding of the row
    sum): relu(u)^p with p < 1 jumps from 0 to O(1) there (u^0.05 = 0.45 at u = 1e-7), so which side
    rounding puts that key on decides the output."""
    if p >= 1:
        return False
    lq, lk = q.shape[-2], k.shape[-2]
    mask = causal_mask(lq, lk) if mask is None else mask
    sp, n, visible = softplus_scores(q.double(), k.double(), mask)
    m = sp.sum(-1, keepdim=True) / n.clamp_min(1)
    close = ((sp - m).abs() <= 8 * n * torch.finfo(torch.float32).eps * m) & visible
    t = (sp.amax(-1, keepdim=True) - m) / m.clamp_min(1e-300)
    reweights = (n > 3) & (t > tie_tolerance(n, torch.float32) / 8)
    return bool((close.any(-1, keepdim=True) & reweights).any())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("p", [0.05, 0.5, 1.0, 3.0, 15.0, 50.0])
@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-4, 1e-2])
def test_half_precision_gradients_stay_finite_for_every_p(dtype, p, noise):
    """Short, tied and nearly tied rows: the cases that gave inf fp16 gradients before the bound.
    Both backends apply the same bound: their gradients agree to 2% of the largest entry (these rows
    amplify fp32 rounding by up to 1 / eps_in), outputs to a few half ulp."""
    g = torch.Generator().manual_seed(int(p * 100) + int(noise * 1e6))
    q = torch.randn(2, 4, 12, 16, generator=g) * 10
    k = torch.randn(2, 2, 12, 16, generator=g)
    k = (k[:, :, :1] + noise * k).to(dtype)
    v = torch.randn(2, 2, 12, 16, generator=g).to(dtype)
    dout = torch.randn(2, 4, 12, 16, generator=g)
    results = {}
    for backend in GRAD_BACKENDS:
        results[backend] = _grads(backend, q.to(dtype), k, v, p, dout)
        assert all(torch.isfinite(x).all() for x in results[backend]), backend
    if near_the_threshold(q.to(dtype), k) or near_the_mean(q.to(dtype), k, p):
        return  # finite is all that can be asked where the tie decision, or a key's side of m, is rounding
    # triton rounds the q.k operands to the input precision (docs/kernels.md): on these ill-conditioned
    # rows that is a different rounding of the problem, so only finiteness is asked of it
    for backend in ("blocked", "native"):
        for name, a, b, rtol in zip(("out", "dq", "dk", "dv"), results["materialized"], results[backend],
                                    (8 * torch.finfo(dtype).eps, 2e-2, 2e-2, 2e-2)):
            scale = max(1.0, b.double().abs().max().item())
            assert (a.double() - b.double()).abs().max().item() <= rtol * scale, (backend, name)


@pytest.mark.parametrize("dtype", HALF)
def test_the_half_precision_bound_leaves_well_conditioned_rows_exact(dtype):
    """Random rows (every N*A - 1 far from 0): half-precision gradients equal the float64 reference
    on the same rounded inputs, i.e. the bound is not in play."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 30, 16, generator=g).to(dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    dout = torch.randn(1, 4, 30, 16, generator=g)
    ours = _grads("blocked", q, k, v, 15.0, dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, None, "lssar", 15.0)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, dout.double())]
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, want):
        assert (a.double() - b).abs().max().item() <= 8 * eps * max(1.0, b.abs().max().item()), name


def test_fp16_tied_rows_gradient_is_the_lssa_gradient():
    """An exactly tied fp16 row with N > 3 is LSSA's: its gradients equal the LSSA variant's (rows
    1-3 re-weight without offset, where p changes the gradient: they get no upstream gradient)."""
    q, k, v = tied_inputs(1, 2, 2, 16, 16, 16, torch.float16)
    dout = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    dout[:, :, :3] = 0
    for backend in GRAD_BACKENDS:
        lssar = _grads(backend, q, k, v, 15.0, dout)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = lssa_attention(*leaves, variant="lssa", backend=backend)[0]
        lssa = [out.detach(), *torch.autograd.grad(out, leaves, dout.half())]
        for a, b in zip(lssar, lssa):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * max(1.0, b.abs().max().item()))


def underflow_inputs(variant_mask: bool, seed=0):
    """Queries pointing away from every key (cosine about -0.9) and tau = 16 at d = 16: scores from about
    -28 (N = 2) to -330 (N = 128). Rows past N of about 10 underflow softplus in float32 (all scores
    below -87), earlier rows do not: both kinds in one call. float64 (the reference) holds them all
    (its exp underflows only below -745). GQA (4 query heads, 2 KV heads); ``variant_mask``: an explicit
    mask with padding and a sliding window, so some rows have N <= 3 (no offset in LSSAR)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, generator=g, dtype=torch.float64)
    k = base + 0.3 * torch.randn(2, 2, 128, 16, generator=g, dtype=torch.float64)
    q = -base + 0.3 * torch.randn(2, 4, 128, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 128, 16, generator=g, dtype=torch.float64)
    tau = torch.tensor([16.0, 12.0, 16.0, 1.0], dtype=torch.float64)  # one head never underflows
    mask = None
    if variant_mask:
        mask = causal_mask(128, 128).expand(2, 1, 128, 128).clone()
        mask[1, :, :, :5] = False  # left padding of the second sequence
        mask[:, :, 64:, :] &= causal_mask(64, 128, window=3)  # a window of 3 keys: N <= 3
    return q, k, v, mask, tau


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("backend", GRAD_BACKENDS + ["flex"])
def test_rows_whose_scores_all_underflow_softplus(backend, variant, with_mask):
    """Rows whose scores all lie below float32's softplus range (S = 0 in a plain float32 sum) take
    exp(s - max s) (``functional.underflow_shift``): outputs and gradients match the float64 reference,
    and rows that do not underflow are unchanged."""
    q, k, v, mask, tau = underflow_inputs(with_mask)
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v)]
    want = reference_attention(*leaves64, mask, variant=variant, p=5.0, temperature=tau)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, leaves64, dout)
    assert torch.isfinite(want).all()
    if backend == "flex":  # forward (on CPU: causal LSSA, else the blocked kernel runs)
        with torch.no_grad():
            out = lssa_attention(q.float(), k.float(), v.float(), mask, variant=variant, p=5.0, backend=backend,
                                 temperature=tau.float())[0]
        torch.testing.assert_close(out.double(), want.detach(), rtol=0, atol=2e-4)
        return
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    before = blocked.underflow_counts["rows"]
    out = lssa_attention(*leaves, mask, variant=variant, p=5.0, backend=backend, temperature=tau.float())[0]
    if backend != "materialized":  # the strip kernels' second pass ran, and counted the rows it shifted
        assert blocked.underflow_counts["rows"] > before
    grads = torch.autograd.grad(out, leaves, dout.float())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-4)
    for got, ref in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-3 * max(1.0, ref.abs().max().item()))


def test_underflow_inputs_do_underflow():
    """The inputs above reach the case they test: some rows have every visible score below -87 (float32
    softplus is 0 there), others do not."""
    q, k, v, mask, tau = underflow_inputs(False)
    qn = q / q.norm(dim=-1, keepdim=True)
    kn = (k / k.norm(dim=-1, keepdim=True)).repeat_interleave(2, dim=1)
    n = torch.arange(1, 129, dtype=torch.float64)[:, None]
    s = tau.view(1, 4, 1, 1) * math.log(16) * torch.log(n) * (qn @ kn.transpose(-1, -2))
    row_max = torch.where(causal_mask(128, 128), s, -math.inf).amax(-1)
    assert (row_max < -87).sum() > 100 and (row_max > -80).sum() > 100


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_ordinary_rows_take_one_pass(variant):
    """Without underflowing rows (tau = 1 and random inputs; rows with N <= 3 and fully masked rows
    included) the strip kernels never run their second pass."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g) for _ in range(3))
    mask = causal_mask(300, 300).expand(2, 1, 300, 300).clone()
    mask[0, :, 10:20] = False  # rows without visible keys
    before = blocked.underflow_counts["calls"]
    for backend in ("blocked", "native"):
        lssa_attention(q, k, v, mask, variant=variant, backend=backend)
        lssa_attention(q, k, v, None, variant=variant, backend=backend)
    assert blocked.underflow_counts["calls"] == before
