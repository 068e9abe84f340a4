"""Diagnostic: is it LSSA's growing length scale log(N_i), or RoPE, that breaks an adapted model past
its adaptation length? Evaluates a trained adapter with log(N_i) capped at given lengths (the cap
replaces ``lssa_hf.functional.length_scale``, which every kernel calls, for this process only) and
prints perplexity per quarter of the window, so a RoPE breakdown shows as one bad quarter.

    python recipes/adapt/probe_length_scale.py \
        --adapter recipes/adapt/results/table-baselines-cpu/runs/lssar-p5-3036e641 --length 16384 \
        --caps none 512 8192 [--rope yarn:2]

The windows are the table's (``table-baselines-cpu.yaml``: WikiText-2 test from 10 % in); ``--windows 1``
takes the first. Not a feature: a capped scale is not LSSA.
"""

import argparse
import math
import time

import torch

import lssa_hf.functional as functional
from lssa_hf.data import blocks, read_text, tokenize
from lssa_hf.evaluation import token_losses
from lssa_hf.models import load_adapted
from lssa_hf.patching import update_settings
from lssa_hf.rope import apply_rope

UNCAPPED = functional.length_scale


def capped(cap):
    return UNCAPPED if cap is None else (lambda visible, head_dim: UNCAPPED(visible.clamp_max(cap), head_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a trained run folder (finetune output_dir)")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--rope", help="RoPE scaling set for the evaluation, e.g. yarn:2")
    parser.add_argument("--p", type=float, help="LSSAR's power for the evaluation (default: the adapter's)")
    parser.add_argument("--caps", nargs="+", default=["none", "512"], help="N at which log(N_i) stops growing")
    parser.add_argument("--text", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--edges", type=int, nargs="+",
                        help="print perplexity per range of positions split here (e.g. 512 1024 2048 4096) "
                             "instead of per quarter: does the loss keep falling past the adaptation length?")
    args = parser.parse_args()
    model, tokenizer = load_adapted(args.adapter)
    if args.rope:
        apply_rope(model, args.rope)
    if args.p is not None:
        update_settings(model, p=args.p)
    ids = tokenize(tokenizer, read_text(args.text))
    windows = blocks(ids[int(len(ids) * 0.1):], args.length, max(1, 32768 // args.length))[:args.windows]
    for cap in [None if c == "none" else int(c) for c in args.caps]:
        functional.length_scale = capped(cap)
        start = time.time()
        with torch.no_grad():
            losses = torch.stack([token_losses(model, w[None]).flatten() for w in windows])
        ranges = position_ranges(losses.shape[1], args.edges)
        parts = [math.exp(losses[:, a:b].mean().item()) for a, b in ranges]
        by = "quarter" if not args.edges else "positions " + " / ".join(f"{a}-{b}" for a, b in ranges)
        print(f"L={args.length} rope={args.rope} p={args.p} cap={cap}: ppl {math.exp(losses.mean().item()):.2f}, by {by} "
              f"{' / '.join(f'{q:.2f}' for q in parts)} ({time.time() - start:.0f} s)", flush=True)


def position_ranges(length: int, edges: list | None) -> list[tuple[int, int]]:
    """[start, end) of each quarter of the predicted positions, or of the ranges between ``edges``
    (prediction i comes from the query that sees i + 1 keys)."""
    cuts = [length * k // 4 for k in range(5)] if not edges else [0] + [e for e in edges if 0 < e < length] + [length]
    return list(zip(cuts[:-1], cuts[1:]))


if __name__ == "__main__":
    main()
