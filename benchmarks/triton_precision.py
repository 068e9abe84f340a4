"""Operand precision of the Triton kernels' matmuls, measured against the float64 reference.

    TRITON_INTERPRET=1 python benchmarks/triton_precision.py     # ~10 minutes on 2 busy CPU cores

Runs the real kernels under Triton's interpreter, which rounds each matmul operand to the chosen
precision and multiplies in fp32 (exactly what tensor cores do with fp32 accumulation; tf32x3 as
three tf32 products, as on the GPU, where fp32 operands run as tf32x3), for
operand precisions of the scores q.k, the output w.v, the backward matmuls with v / dout and the
gradient matmuls ds.k / ds.q, on bf16 and fp16 inputs, LSSA and LSSAR
(p = 15). The temperature tau = log(131072) / log(L) gives the last row the length scale of a
128K-token context (the largest scores, hence the largest score rounding). Two kinds of data:
random Gaussian q, k, v (nearly uniform rows) and "peaked" rows (each query close to one key).
Errors: max |got - ref| / max |ref| for the output and the q, k, v gradients; the "blocked" row is
the fp32 pure-torch kernel (only the output rounding to the input dtype).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (scores q.k, output w.v, backward matmuls with v / dout, gradient matmuls ds.k / ds.q);
# "input": the input dtype. The second row is the default when training, the last-but-one the
# default for inference (its gradients are not used).
COMBOS = [("tf32x3", "tf32x3", "tf32x3", "tf32x3"), ("fp16", "tf32x3", "input", "tf32x3"),
          ("fp16", "tf32x3", "input", "input"), ("bf16", "tf32x3", "input", "tf32x3"),
          ("fp16", "input", "input", "tf32x3"), ("fp16", "input", "input", "input")]


def inputs(kind, dtype, b, h, length, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "peaked":  # each query near one earlier key (cosine ~0.9): sharp rows
        idx = (torch.rand(length, generator=g) * (torch.arange(length) + 1)).long()
        q = k[:, :, idx] + 0.5 * q / math.sqrt(d) * k.norm(dim=-1, keepdim=True).mean()
    dout = torch.randn(b, h, length, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def errors(fn, q, k, v, dout, ref, ref_grads):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    rel = lambda a, r: ((a.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    return [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, ref_grads)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from lssa_hf.kernels.blocked import blocked_attention
    from lssa_hf.kernels.triton_lssa import triton_attention
    from reference import reference_attention

    length, d = args.length, args.head_dim
    tau = torch.full((args.heads,), math.log(131072) / math.log(length))
    print(f"B=1, H={args.heads}, L={length}, D={d}, causal, tau={tau[0]:.3f} (128K length scale), "
          "max relative error vs float64 reference: out | dq | dk | dv")
    print("| inputs | data | variant | q.k | w.v | dout.v, w.dout | ds.k, ds.q | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        for kind in ("random", "peaked"):
            q, k, v, dout = inputs(kind, dtype, 1, args.heads, length, d)
            for variant in ("lssa", "lssar"):
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                ref = reference_attention(*leaves, None, variant, 15.0, temperature=tau)
                ref_grads = torch.autograd.grad(ref, leaves, dout.double())
                ref = ref.detach()
                runs = {("blocked", "fp32", "fp32", "fp32"): lambda a, b_, c: blocked_attention(a, b_, c, None, variant=variant,
                                                                                temperature=tau)}
                for combo in COMBOS:
                    prec = tuple(name if x == "input" else x for x in combo)
                    runs[prec] = (lambda a, b_, c, prec=prec: triton_attention(
                        a, b_, c, None, variant=variant, temperature=tau, precision=prec))
                for prec, fn in runs.items():
                    errs = errors(fn, q, k, v, dout, ref, ref_grads)
                    print(f"| {name} | {kind} | {variant} | {' | '.join(prec)} | " + " | ".join(f"{e:.1e}" for e in errs) + " |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
