"""The native CPU strips (all four passes) under every ISA build this machine runs, against float64.

Both builds (the host's, e.g. AVX-512, and the forced narrower AVX2 one) are loaded in one process,
keyed by ISA; ``native.calls`` (a counter of which implementation ran) proves the native one did.
"""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from lssa_hf.attention import lssa_attention
from lssa_hf.kernels import blocked, native
from lssa_hf.kernels.blocked import blocked_attention
from reference import reference_attention
from test_kernels import CASES, _assert_close, _check, _fp32_tol, _inputs, _masks

BUILDS = [isa for isa in ("avx512", "avx2", "default")
          if native.ISAS.index(isa) <= native.ISAS.index(native.host_isa())][:2]  # host's and the next


@pytest.fixture(params=BUILDS)
def isa(request, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, request.param)
    if not native.available(request.param):
        pytest.fail(f"native {request.param} build unavailable: {native.unavailable_reason(request.param)}")
    return request.param


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_every_kernel_case_under_each_isa(isa, variant, dtype):
    """Outputs and gradients of every kernel case (ragged strips, padding, window, packing, GQA,
    decode, chunked prefill) equal the float64 reference, with this ISA's build running."""
    tol = 1e-9 if dtype == torch.float64 else _fp32_tol(variant, 15.0)
    before = native.calls[isa]
    for b, hq, hkv, lq, lk, kind in CASES:
        q, k, v = _inputs(b, hq, hkv, lq, lk, 16, dtype)
        mask = _masks(kind, b, lq, lk)
        _check(lambda a, b_, c: blocked_attention(a, b_, c, mask, variant=variant, block_q=7, impl="native"),
               q, k, v, mask, variant, 15.0, tol)
    assert native.calls[isa] - before == 2 * len(CASES)  # forward and backward, natively


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_key_tiles_under_each_isa(isa, dtype, monkeypatch):
    """LSSA's fused forward and backward walk query blocks and key tiles (S, sum sp v, dq, dk, dv
    accumulate): blocks of 3 rows and tiles of 5 keys here, so every kernel case (causal cuts,
    masks, windows, packing, GQA, decode) crosses both; and the strip path (K_BLOCK = 0) is exact too."""
    threads = torch.get_num_threads()
    try:  # one thread: the fused backward takes every case (it needs a (batch, KV head) per thread)
        for n_threads, q_block, k_block in ((1, 3, 5), (threads, 3, 5), (1, 1, 1), (threads, 64, 0)):
            torch.set_num_threads(n_threads)
            monkeypatch.setattr(native, "Q_BLOCK", q_block)
            monkeypatch.setattr(native, "K_BLOCK", k_block)
            _check_lssa_cases(dtype)
    finally:
        torch.set_num_threads(threads)


def _check_lssa_cases(dtype):
    tol = 1e-9 if dtype == torch.float64 else _fp32_tol("lssa", 15.0)
    for b, hq, hkv, lq, lk, kind in CASES:
        q, k, v = _inputs(b, hq, hkv, lq, lk, 16, dtype)
        mask = _masks(kind, b, lq, lk)
        _check(lambda a, b_, c: blocked_attention(a, b_, c, mask, variant="lssa", block_q=7, impl="native"),
               q, k, v, mask, "lssa", 15.0, tol)


def test_temperature_and_long_rows_under_each_isa(isa):
    q, k, v = _inputs(2, 4, 2, 45, 45, 16)
    tau = torch.tensor([0.5, 1.0, 2.0, 3.5], dtype=torch.float64, requires_grad=True)
    for variant in ("lssa", "lssar"):
        out = blocked_attention(q, k, v, _masks("packed", 2, 45, 45), variant=variant, block_q=7,
                                temperature=tau, impl="native")
        want = reference_attention(q, k, v, _masks("packed", 2, 45, 45), variant, temperature=tau)
        got_t, = torch.autograd.grad(out.sum(), tau)
        want_t, = torch.autograd.grad(want.sum(), tau)
        _assert_close(out, want, 1e-9, "out")
        _assert_close(got_t, want_t, 1e-8, "dtau")
    q, k, v = _inputs(1, 2, 1, 700, 700, 32, torch.float32)  # default strip sizing, wide rows
    for variant in ("lssa", "lssar"):
        _check(lambda a, b_, c: blocked_attention(a, b_, c, None, variant=variant, budget=1 << 16, impl="native"),
               q, k, v, None, variant, 15.0, _fp32_tol(variant, 15.0))


def test_nan_scores_stay_visible(isa):
    q, k, v = _inputs(1, 2, 2, 40, 40, 8, torch.float32)
    q[0, 0, 20, 3] = torch.nan  # a diverged query must not vanish into a finite output
    for variant in ("lssa", "lssar"):
        out = blocked_attention(q, k, v, None, variant=variant, block_q=16, impl="native")
        assert torch.isnan(out[0, 0, 20]).all() and torch.isfinite(out[0, 1]).all()


def test_isa_switch_refuses_what_this_cpu_cannot_run(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="use one of"):
        native.isa()
    monkeypatch.setenv(native.ISA_ENV, "auto")
    assert native.isa() == native.host_isa()
    if native.host_isa() != "avx512":
        monkeypatch.setenv(native.ISA_ENV, "avx512")
        with pytest.raises(ValueError, match="this CPU runs at most"):
            native.isa()


def test_native_builds_wherever_it_is_supported():
    """Failing the ISA tests above must mean a broken build, never a silent skip."""
    assert native.supported() or not sys.platform.startswith("linux")
    assert native.available()


def test_no_compiler_falls_back_to_torch_strips_with_a_logged_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setattr(native, "_unavailable", {})
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
    assert "no C++ compiler" in caplog.text and "pure-torch strips" in caplog.text
    before = native.calls["torch"]
    q, k, v = _inputs(1, 2, 2, 30, 30, 8)
    _check(lambda a, b_, c: blocked_attention(a, b_, c, None, variant="lssar", block_q=7, impl="native"),
           q, k, v, None, "lssar", 15.0, 1e-9)
    assert native.calls["torch"] - before == 2


def test_a_fresh_process_loads_the_build_without_compiling():
    code = ("import time, torch.utils.cpp_extension as ce; ce.load = None; "  # any build attempt fails
            "from lssa_hf.kernels import native; t = time.perf_counter(); m = native.module(); "
            "print(m is not None, time.perf_counter() - t)")
    native.module()  # built (cached) in this process first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    ok, seconds = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                 check=True).stdout.split()
    assert ok == "True" and float(seconds) < 1.0, seconds


def test_native_env_switch(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.supported()


def test_ninja_wheel_is_used_without_an_activated_venv(monkeypatch):
    import ninja  # a dependency of lssa-hf
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]


def test_many_shapes_keep_the_native_path(monkeypatch):
    """100 distinct shape / dtype / mask calls through ``auto``: every one runs the native strips
    (nothing recompiles, nothing falls back), and a final call still does."""
    from lssa_hf import attention
    monkeypatch.delenv("LSSA_BACKEND", raising=False)
    monkeypatch.setattr(attention, "MATERIALIZE_MAX_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    seen = set()
    torch_before, native_before = native.calls["torch"], native.calls[native.isa()]
    while len(seen) < 100:
        b, hkv = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        hq = hkv * int(torch.randint(1, 4, (1,), generator=g))
        d = int(torch.randint(1, 9, (1,), generator=g)) * 8
        lk = int(torch.randint(1, 160, (1,), generator=g))
        lq = lk if torch.rand(1, generator=g) < 0.7 else 1  # prefill or decode
        dtype = (torch.float32, torch.float64, torch.bfloat16)[int(torch.randint(0, 3, (1,), generator=g))]
        kind = None if lq == 1 or torch.rand(1, generator=g) < 0.5 else "padding"
        key = (b, hq, hkv, d, lq, lk, dtype, kind)
        if key in seen or (kind == "padding" and lk < 7):
            continue
        seen.add(key)
        q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=len(seen))
        q.requires_grad_(len(seen) % 2 == 0)
        out, _ = lssa_attention(q, k, v, _masks(kind, b, lq, lk), variant="lssar" if d % 16 else "lssa")
        if q.requires_grad:
            out.float().sum().backward()
    assert native.calls["torch"] == torch_before  # CPU float32/float64/bf16: never the fallback
    ran = native.calls[native.isa()] - native_before
    assert ran >= 100
    q, k, v = _inputs(1, 4, 2, 300, 300, 32, torch.float32)
    lssa_attention(q, k, v, variant="lssar")
    assert native.calls[native.isa()] - native_before == ran + 1  # the fast path is still the one
