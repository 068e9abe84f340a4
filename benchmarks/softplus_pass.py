"""The LSSA forward strip pass alone: softplus of a score strip in place, plus its row sums.

    python benchmarks/softplus_pass.py --threads 2

Times, on one fp32 strip of real scores (8 heads x 64 rows x L keys, the blocked kernel's strip at
8K: c * cos with c = log(64) log(L), random q and k), torch's
softplus + sum (the ``blocked`` path), the inductor-compiled polynomial softplus + sum (the compiled
fallback) and the native AVX-512 kernel (``kernels/native.py``), with exp_ as a yardstick:
medians of interleaved repetitions.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lssa_hf.kernels import blocked, native  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled_softplus = torch.compile(blocked.softplus_, dynamic=True)
    methods = {
        "exp_ (yardstick)": lambda s: torch.exp_(s),
        "torch softplus + sum": lambda s: blocked.fwd_lssa(s),
        "compiled polynomial + sum": lambda s: blocked.fwd_lssa(s, softplus=compiled_softplus),
    }
    if native.available():
        methods["native AVX-512 (fused sum)"] = native.module().softplus_rowsum_
    # real scores: c * cos(q, k) with c = log(d) log(N) for d = 64, N = keys, random q and k
    q, k = (F.normalize(torch.randn(8, n, 64), dim=-1) for n in (64, args.keys))
    strip = math.log(64) * math.log(args.keys) * (q @ k.transpose(-1, -2))
    times = {name: [] for name in methods}
    for name, fn in methods.items():  # warm-up (compiles)
        fn(strip.clone())
    for _ in range(args.reps):
        for name, fn in methods.items():
            s = strip.clone()
            start = time.perf_counter()
            fn(s)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch softplus + sum"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, strip 8 x 64 x {args.keys} fp32")
    print("| pass | median ms | x torch softplus |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.2f} | {statistics.median(t) / base:.2f} |")


if __name__ == "__main__":
    main()
