"""The native CPU kernel (LSSA forward strip) and the fp32 log1p polynomial, against float64."""

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lssa_hf.attention import lssa_attention
from lssa_hf.kernels import blocked, compiled, native
from reference import reference_attention

needs_native = pytest.mark.skipif(not native.available(), reason="native kernel not available here")


def _scores(rows, width, seed=0):
    """float64 copies of fp32-representable scores (so fp32 input rounding is not counted)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(rows, width, generator=g) * 240 - 120)  # beyond |log(d) log(N)|
    s[:, ::7] = -torch.inf  # masked keys
    return s.double()


def _check_softplus(got, s64, rtol=1e-6):
    want = F.softplus(s64)
    err = (got.double() - want).abs() - rtol * want - 1e-37  # fp32 underflows below ~1e-38
    assert err.max().item() <= 0, f"softplus off by {err.max().item():.3g}"
    assert (got[s64 == -torch.inf] == 0).all()  # masked scores carry exactly no weight


def test_log1p_polynomial_is_a_refit_of_log1p():
    e = np.cos(np.pi * (np.arange(4000) + 0.5) / 4000) * 0.5 + 0.5  # Chebyshev nodes on [0, 1]
    fit = np.polynomial.Chebyshev.fit(e, np.log1p(e) / e, 9, domain=[0, 1]).convert(
        kind=np.polynomial.Polynomial, domain=[0, 1], window=[0, 1]).coef
    np.testing.assert_allclose(blocked.LOG1P_RATIO, fit, rtol=1e-6, atol=1e-9)
    grid = np.linspace(0, 1, 100001)[1:]
    ratio = np.polynomial.polynomial.polyval(grid, blocked.LOG1P_RATIO)
    assert np.abs(ratio * grid / np.log1p(grid) - 1).max() < 1e-8


def test_cpp_uses_the_same_polynomial():
    text = native.SOURCE.read_text()
    body = re.search(r"kLog1pRatio\[10\] = \{(.*?)\};", text, re.S).group(1)
    coef = [float(x.strip().rstrip("f")) for x in body.split(",")]
    np.testing.assert_allclose(coef, blocked.LOG1P_RATIO, rtol=1e-15)


def test_compiled_fp32_softplus_matches_float64():
    if not compiled.enabled():
        pytest.skip("compilation disabled (LSSA_COMPILE=0)")
    s64 = _scores(6, 333)
    got = torch.compile(blocked.softplus_, dynamic=True)(s64.float())  # the polynomial path
    _check_softplus(got, s64)


@needs_native
@pytest.mark.parametrize("width", [1, 15, 16, 17, 31, 32, 33, 100, 1000])
def test_native_softplus_and_row_sums(width):
    s64 = _scores(5, width, seed=width)
    s = s64.float().view(5, 1, width)
    sums = native.module().softplus_rowsum_(s)
    _check_softplus(s.view(5, width), s64)
    assert sums.shape == (5, 1, 1)
    want = F.softplus(s64).sum(-1)
    assert ((sums.view(5).double() - want).abs() <= 1e-6 * want).all()


@needs_native
def test_native_keeps_nan_visible():
    s = torch.zeros(2, 40)
    s[0, 33] = torch.nan  # a diverged score must not vanish into a finite row sum
    sums = native.module().softplus_rowsum_(s)
    assert torch.isnan(s[0, 33]) and torch.isnan(sums[0, 0])
    assert torch.isfinite(s[1]).all() and sums[1, 0] == pytest.approx(40 * math.log(2), rel=1e-6)


@needs_native
def test_native_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match="contiguous float32 CPU"):
        native.module().softplus_rowsum_(torch.zeros(4, 4, dtype=torch.float64))
    calls = []
    fwd = native.lssa_forward(lambda s: calls.append(s) or (s, s.sum(-1, keepdim=True)))
    fwd(torch.zeros(3, 4, dtype=torch.float64))  # float64 keeps the exact path
    fwd(torch.zeros(4, 3).t())  # non-contiguous
    assert len(calls) == 2


@needs_native
@pytest.mark.parametrize("mask_kind", [None, "padding"])
def test_cpu_lssa_forward_uses_the_native_kernel(monkeypatch, mask_kind):
    if not compiled.enabled():
        pytest.skip("compilation disabled (LSSA_COMPILE=0)")
    calls = []
    real = native.module().softplus_rowsum_
    monkeypatch.setattr(native.module(), "softplus_rowsum_", lambda s: calls.append(s.shape) or real(s))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 800, 32, generator=g) for _ in range(3))
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(800, 800).tril().bool().expand(1, 1, 800, 800).clone()
        mask[..., :50] = False
    with torch.no_grad():
        out, _ = lssa_attention(q, k, v, mask, variant="lssa")  # auto: above the materialised size
    assert calls, "the CPU fp32 LSSA forward did not run the native kernel"
    want = reference_attention(q.double(), k.double(), v.double(), mask, "lssa")
    assert (out.double() - want).abs().max().item() < 2e-5


def test_native_builds_wherever_it_is_supported():
    """Skipping the native tests must mean an unsupported machine, never a broken build."""
    if native.supported() and shutil.which("c++"):
        assert native.available()


def test_native_env_switch(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.supported()


def test_ninja_wheel_is_used_without_an_activated_venv(monkeypatch):
    import ninja  # a dependency of lssa-hf
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]
