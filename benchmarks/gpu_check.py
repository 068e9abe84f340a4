"""One-shot CUDA check of the LSSA kernels: exactness (bf16, forward + backward) and speed vs SDPA.

    python benchmarks/gpu_check.py            # ~5 minutes on one H100/H200-class GPU

1. flex and blocked against the float64 reference on bf16 inputs (GQA, padding mask, decode).
2. Median time of SDPA and of each LSSA / LSSAR path at 16K tokens (B=1, H=8, D=64, causal, bf16),
   forward and forward+backward, and whether a 128K-token forward(+backward) fits, with peak memory.
Prints one table. Exits cleanly (status 0) when no CUDA device is present.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run this on a GPU machine).")
        return 0
    from lssa_hf.attention import lssa_attention
    from lssa_hf.kernels import flex
    from reference import reference_attention

    dev = torch.device("cuda")
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, grad=False):
        return torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(grad)

    # ---- 1. exactness on bf16 inputs, against the float64 reference of the same rounded inputs
    cases = {"causal GQA 1024": (1, 8, 2, 1024, 1024, None), "decode 1x4096": (2, 8, 2, 1, 4096, None)}
    pad = torch.ones(2, 1, 512, 512, dtype=torch.bool, device=dev).tril()
    pad[0, :, :, :40] = False
    cases["padding 512"] = (2, 4, 2, 512, 512, pad)
    for name, (b, hq, hkv, lq, lk, mask) in cases.items():
        q, k, v = rnd(b, hq, lq, 64, grad=True), rnd(b, hkv, lk, 64, grad=True), rnd(b, hkv, lk, 64, grad=True)
        dout = rnd(b, hq, lq, 64)
        for variant in ("lssa", "lssar"):
            ref = reference_attention(q, k, v, mask, variant)
            ref_g = torch.autograd.grad(ref, (q, k, v), dout.double())
            for backend in ("blocked", "blocked_compiled", "flex"):
                grad = not (backend == "flex" and variant == "lssar")
                try:
                    out = lssa_attention(q, k, v, mask, variant=variant, backend=backend)[0]
                    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
                    gerr = float("nan")
                    if grad:
                        g = torch.autograd.grad(out, (q, k, v), dout)
                        gerr = max((a.double() - r).abs().max().item() / r.abs().max().item()
                                   for a, r in zip(g, ref_g))
                    ok = err < 2e-2 and (not grad or gerr < 5e-2)
                    rows.append(("check", name, f"{variant} {backend}", f"out {err:.1e}", f"grad {gerr:.1e}",
                                 "OK" if ok else "MISMATCH"))
                except Exception as exc:  # report, keep going
                    rows.append(("check", name, f"{variant} {backend}", "error", type(exc).__name__, str(exc)[:60]))

    # ---- 2. speed at 16K and a 128K fit
    for length, reps in ((16384, 5), (131072, 1)):
        q, k, v = (rnd(1, 8, length, 64, grad=True) for _ in range(3))
        dout = rnd(1, 8, length, 64)
        paths = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for variant in ("lssa", "lssar"):
            for backend in ("auto", "blocked", "blocked_compiled", "flex"):
                paths[f"{variant} {backend}"] = (
                    lambda var=variant, be=backend: lssa_attention(q, k, v, None, variant=var, backend=be)[0])
        base = {}
        for name, fn in paths.items():
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd+bwd" and name.startswith("lssar flex"):
                    continue  # flex LSSAR is inference-only; lssa_attention would run blocked instead
                def call(fn=fn, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            fn()
                    else:
                        fn().backward(dout)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    t = timed(call, reps)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    base.setdefault(mode, t) if name == "sdpa" else None
                    rows.append((f"{length // 1024}K", mode, name, f"{t:.4f} s",
                                 f"{t / base[mode]:.2f}x SDPA" if mode in base else "", f"peak {peak:.2f} GiB"))
                except torch.cuda.OutOfMemoryError:
                    rows.append((f"{length // 1024}K", mode, name, "OOM", "", ""))
                except Exception as exc:
                    rows.append((f"{length // 1024}K", mode, name, "error", type(exc).__name__, str(exc)[:60]))
                for t_ in (q, k, v):
                    t_.grad = None
        del q, k, v, dout
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; flex available: {flex.available()}")
    for row in rows:
        print(" | ".join(str(x) for x in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
