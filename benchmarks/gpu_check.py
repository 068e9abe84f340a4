"""One-shot GPU check of the LSSA kernels: exactness, speed vs flash SDPA, a model at 32K. Exits 1
on any mismatch or error, so it can gate a GPU run.

    python benchmarks/gpu_check.py                                  # < 8 minutes on one H200
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run     # tiny, on CPU (tests run this)

1. Kernels against the float64 reference on bf16 inputs, outputs and q/k/v gradients: the Triton
   kernels (causal GQA, decode, padding, window, packed doc ids, a dense mask, temperature; a spy
   checks the Triton kernels ran), and the blocked and flex backends on CUDA.
2. Median times in bf16 (B=1, H=8, D=64, causal) at 4K-128K of flash SDPA and LSSA / LSSAR
   (triton; flex for LSSA), forward and forward+backward, as ratios to SDPA, with peak memory.
3. SmolLM2-135M (offline GGUF) with sdpa vs LSSA / LSSAR (triton) at 32K tokens: forward and
   forward+backward time; the LSSA losses through triton and through the blocked kernel must agree.
--dry-run: tiny shapes on CPU through Triton's interpreter, a tiny Llama instead of SmolLM2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BF16_ULP = 2.0 ** -8
TOL_OUT = {"lssa": 4 * BF16_ULP, "lssar": 4 * BF16_ULP + 15 * 2.0 ** -11}  # as tests/test_triton.py
TOL_GRAD = {"lssa": 8 * BF16_ULP, "lssar": 8 * BF16_ULP + 15 * 2.0 ** -11}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    if reps > 1:  # warm-up (compilation) apart from the timed calls
        fn()
        _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rnd(gen, device, *shape, grad=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=torch.bfloat16)
    return x.requires_grad_(grad)


def _cases(dry_run: bool):
    """name -> (b, hq, hkv, lq, lk, mask kind, triton_attention kwargs)."""
    n, dec = (20, 24) if dry_run else (1024, 4096)
    return {"causal GQA": (1, 4, 2, n, n, None, {}), "decode": (2, 4, 2, 1, dec, None, {}),
            "padding": (2, 2, 1, n, n, "padding", {}), "window": (1, 2, 1, n, n, "window", {"window": 9}),
            "packed": (1, 2, 1, n, n, "packed", {"doc_ids": torch.arange(n)[None] * 3 // n}),
            "dense mask": (1, 2, 1, n // 2, n, "dense", {}), "temperature": (1, 4, 2, n, n, None, {})}


def _mask(kind, b, lq, lk, device, gen):
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    if kind == "padding":
        m = causal.expand(b, 1, lq, lk).clone()
        m[0, :, :, :6] = False  # left padding, fully masked rows
    elif kind == "window":
        m = causal & (torch.arange(lk)[None, :] > torch.arange(lk - lq, lk)[:, None] - 9)
    elif kind == "packed":
        doc = torch.arange(lk) * 3 // lk
        m = causal & (doc[None, :] == doc[lk - lq:][:, None])
    elif kind == "dense":
        m = torch.rand(b, 1, lq, lk, generator=gen) < 0.5
    else:
        return None
    return m.to(device)


def check_kernels(device, dry_run=False, only=None):
    """(rows, ok): every path against the float64 reference on bf16 inputs."""
    from lssa_hf.attention import lssa_attention
    from lssa_hf.kernels import triton_lssa
    from reference import reference_attention

    gen = torch.Generator().manual_seed(0)
    rows, ok = [], True
    for name, (b, hq, hkv, lq, lk, kind, kwargs) in _cases(dry_run).items():
        if only and name not in only:
            continue
        q, k, v = _rnd(gen, device, b, hq, lq, 64), _rnd(gen, device, b, hkv, lk, 64), _rnd(gen, device, b, hkv, lk, 64)
        dout = _rnd(gen, device, b, hq, lq, 64)
        mask = _mask(kind, b, lq, lk, device, gen)
        tau = torch.rand(hq, generator=gen).to(device) + 0.5 if name == "temperature" else None
        for variant in ("lssa", "lssar"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            ref = reference_attention(*leaves, mask, variant, 15.0, temperature=tau)
            ref_g = torch.autograd.grad(ref, leaves, dout.double())
            paths = {"triton": lambda a, b_, c: triton_lssa.triton_attention(
                a, b_, c, None if kwargs else mask, variant=variant, temperature=tau, **kwargs)}
            if device.type == "cuda" and not kwargs:
                for backend in ("blocked", "flex"):
                    paths[backend] = (lambda a, b_, c, be=backend: lssa_attention(
                        a, b_, c, mask, variant=variant, backend=be, temperature=tau)[0])
            for backend, fn in paths.items():
                try:
                    before = triton_lssa.LAUNCHES["fwd"]
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                    out = fn(*leaves)
                    grads = torch.autograd.grad(out, leaves, dout)
                    scale = lambda r: max(r.abs().max().item(), 1.0)  # noqa: E731
                    err = (out.double() - ref).abs().max().item() / scale(ref)
                    gerr = max((a.double() - r).abs().max().item() / scale(r) for a, r in zip(grads, ref_g))
                    good = err <= TOL_OUT[variant] and gerr <= TOL_GRAD[variant]
                    ran = backend != "triton" or triton_lssa.LAUNCHES["fwd"] > before
                    verdict = "OK" if good and ran else ("MISMATCH" if ran else "MISMATCH (triton did not run)")
                    rows.append(("check", name, f"{variant} {backend}", f"out {err:.1e}", f"grad {gerr:.1e}", verdict))
                    ok &= verdict == "OK"
                except Exception as exc:  # report every failure, then fail
                    rows.append(("check", name, f"{variant} {backend}", "error", type(exc).__name__, str(exc)[:80]))
                    ok = False
    return rows, ok


def _run_mode(fn, mode, dout):
    if mode == "fwd":
        with torch.no_grad():
            return fn()
    return fn().backward(dout)


def speed_table(device, lengths, reps, heads=8):
    """Rows of median times and ratios to SDPA (flash on CUDA) in bf16; (rows, ok)."""
    from lssa_hf.attention import lssa_attention

    gen = torch.Generator().manual_seed(0)
    rows, ok = [], True
    for length in lengths:
        q, k, v = (_rnd(gen, device, 1, heads, length, 64, grad=True) for _ in range(3))
        dout = _rnd(gen, device, 1, heads, length, 64)

        def sdpa():
            if device.type != "cuda":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        paths = {"sdpa (flash)": sdpa}
        for variant, backend in (("lssa", "triton"), ("lssar", "triton"), ("lssa", "flex")):
            if backend == "flex" and device.type != "cuda":
                continue
            paths[f"{variant} {backend}"] = (lambda var=variant, be=backend:
                                             lssa_attention(q, k, v, None, variant=var, backend=be)[0])
        base = {}
        for name, fn in paths.items():
            for mode in ("fwd", "fwd+bwd"):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    t = timed(lambda fn=fn, mode=mode: _run_mode(fn, mode, dout), device, reps)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                    if name.startswith("sdpa"):
                        base[mode] = t
                    ratio = f"{t / base[mode]:.2f}x SDPA" if mode in base else ""
                    rows.append((f"{length // 1024}K" if length >= 1024 else str(length), mode, name,
                                 f"{t:.4f} s", ratio, f"peak {peak:.2f} GiB"))
                except torch.cuda.OutOfMemoryError:
                    rows.append((f"{length // 1024}K", mode, name, "OOM", "", ""))
                    ok &= name.startswith("sdpa") or length < 131072  # 128K must fit
                except Exception as exc:
                    rows.append((str(length), mode, name, "error", type(exc).__name__, str(exc)[:80]))
                    ok = False
                for t_ in (q, k, v):
                    t_.grad = None
        del q, k, v, dout
    return rows, ok


def model_check(device, length, check_length, dry_run):
    """SmolLM2 (tiny Llama in a dry run) forward / forward+backward: sdpa vs LSSA / LSSAR (triton);
    LSSA's loss through triton and through the blocked kernel must agree at ``check_length``."""
    import lssa_hf
    from lssa_hf.kernels import triton_lssa

    if dry_run:
        from tiny_models import tiny_model
        model, vocab = tiny_model("llama"), 97
    else:
        from lssa_hf.models import load
        model, _ = load("smollm2", dtype=torch.bfloat16)
        vocab = model.config.vocab_size
    model = model.to(device)
    model.config.use_cache = False
    gen = torch.Generator().manual_seed(0)
    rows, ok = [], True

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss

    ids = torch.randint(3, vocab, (1, check_length), generator=gen).to(device)
    losses = {}
    launches = triton_lssa.LAUNCHES["fwd"]
    for backend in ("triton", "blocked"):
        lssa_hf.patch(model, variant="lssa", backend=backend)
        with torch.no_grad():
            losses[backend] = loss_of(ids).item()
        lssa_hf.unpatch(model)
        if backend == "triton":  # one launch per layer, or the patch did not reach the kernels
            launches = triton_lssa.LAUNCHES["fwd"] - launches
    diff = abs(losses["triton"] - losses["blocked"])
    layers = model.config.num_hidden_layers
    good = diff <= 2e-2 * max(1.0, abs(losses["blocked"])) and launches == layers
    rows.append(("model", f"{check_length} tokens", "lssa loss triton vs blocked",
                 f"{losses['triton']:.4f} vs {losses['blocked']:.4f}", f"diff {diff:.1e}, {launches}/{layers} triton launches", "OK" if good else "MISMATCH"))
    ok &= good
    ids = torch.randint(3, vocab, (1, length), generator=gen).to(device)
    base = {}
    for variant in ("sdpa", "lssa", "lssar"):
        if variant != "sdpa":
            lssa_hf.patch(model, variant=variant, backend="triton")
        else:
            model.set_attn_implementation("sdpa")
        for mode in ("fwd", "fwd+bwd"):
            try:
                def call(mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            loss_of(ids)
                    else:
                        loss_of(ids).backward()
                        model.zero_grad(set_to_none=True)
                t = timed(call, device, 1 if dry_run else 2)
                base.setdefault(mode, t) if variant == "sdpa" else None
                rows.append(("model", f"{length} tokens", f"{variant} {mode}", f"{t:.3f} s",
                             f"{t / base[mode]:.2f}x sdpa" if mode in base else "", ""))
            except Exception as exc:
                rows.append(("model", f"{length} tokens", f"{variant} {mode}", "error", type(exc).__name__,
                             str(exc)[:80]))
                ok = False
        if variant != "sdpa":
            lssa_hf.unpatch(model)
    return rows, ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--model-length", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, lengths, model_length, check_length, reps = torch.device("cpu"), [24], 16, 16, 1
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run for the CPU/interpreter self-test).")
        return 1
    else:
        device, lengths, model_length, check_length, reps = (torch.device("cuda"), args.lengths, args.model_length,
                                                              2048, args.reps)
    from lssa_hf.kernels import flex

    rows, ok = check_kernels(device, args.dry_run)
    speed, speed_ok = speed_table(device, lengths, reps, heads=2 if args.dry_run else 8)
    model_rows, model_ok = model_check(device, model_length, check_length, args.dry_run)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, dry run)"
    print(f"torch {torch.__version__} on {name}; flex available: {flex.available()}")
    print("| what | case | path | value | error / ratio | verdict / memory |")
    print("|---|---|---|---|---|---|")
    for row in rows + speed + model_rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    ok = ok and speed_ok and model_ok
    print("gpu_check:", "all checks passed" if ok else "FAILED (see MISMATCH / error rows)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
