"""Diagnostic: which layers does swapping to LSSA/LSSAR hurt most? Swaps one layer at a time (every
other layer keeps softmax; no training) and prints the perplexity of each, then the layers ranked
worst as a ``softmax_layers`` list for a hybrid row: keep those on softmax.

    python recipes/adapt/probe_layers.py --p 8 --rope yarn:4 --worst 4 8

``--heads`` ranks query heads instead, in one forward of the softmax model: each head's relative
squared error of its LSSA output against its softmax output on the same input (what the warm start
minimises, before it), printed as a ``softmax_heads`` map of the worst k heads.

    python recipes/adapt/probe_layers.py --p 8 --rope yarn:4 --heads --worst 72

The text is training text (WikiText-2 validation from 10 % in), not the table's evaluation text, so
choosing layers from it does not tune on the test set.
"""

import argparse
import math
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lssa_hf.attention import lssa_attention
from lssa_hf.data import blocks, read_text, tokenize
from lssa_hf.evaluation import mean_loss
from lssa_hf.models import DEFAULT_MODEL, load
from lssa_hf.patching import set_attention, unpatch


def layer_ppl(model, windows, args) -> dict:
    """Perplexity with only layer i on ``args.attention``, for every i."""
    layers = model.config.num_hidden_layers
    softmax = math.exp(mean_loss(model, windows))
    print(f"softmax: ppl {softmax:.2f}", flush=True)
    ppl = {}
    for layer in range(layers):
        start = time.time()
        set_attention(model, args.attention, p=args.p, softmax_layers=[j for j in range(layers) if j != layer])
        ppl[layer] = math.exp(mean_loss(model, windows))
        print(f"layer {layer} on {args.attention}: ppl {ppl[layer]:.2f} "
              f"({100 * (ppl[layer] / softmax - 1):+.1f} %, {time.time() - start:.0f} s)", flush=True)
    unpatch(model)
    return ppl


@torch.no_grad()
def head_errors(model, windows, args) -> dict:
    """{(layer, head): |LSSA - softmax|^2 / |softmax|^2} for every head of the softmax model, on its own inputs."""
    sums = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # (B, L, H, D)
        lssa, _ = lssa_attention(query, key, value, None, variant=args.attention, p=args.p)  # plain causal windows
        err, norm = ((lssa.transpose(1, 2) - out) ** 2).sum((0, 1, 3)), (out ** 2).sum((0, 1, 3))
        total = sums.setdefault(module.layer_idx, [0.0, 0.0])
        total[0], total[1] = total[0] + err, total[1] + norm
        return out, weights

    AttentionInterface.register("lssa_head_probe", probe)
    original = model.config._attn_implementation
    model.set_attn_implementation("lssa_head_probe")  # no mask function registered: plain causal, no mask
    try:
        for window in windows:
            model(window[None])
    finally:
        model.set_attn_implementation(original)
    return {(layer, h): float(e / n) for layer, (err, norm) in sums.items() for h, (e, n) in enumerate(zip(err, norm))}


def head_map(heads) -> dict:
    """[(layer, head), ...] as {layer: [heads]}, the ``softmax_heads`` spelling."""
    out = {}
    for layer, head in sorted(heads):
        out.setdefault(layer, []).append(head)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--attention", default="lssar", choices=["lssa", "lssar", "ssmax"])
    parser.add_argument("--p", type=float, default=8.0)
    parser.add_argument("--rope", help="RoPE scaling set on the checkpoint first, e.g. yarn:4")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    parser.add_argument("--worst", type=int, nargs="+", default=[4, 8], help="sizes of the printed worst lists")
    parser.add_argument("--heads", action="store_true", help="rank query heads (one forward) instead of layers")
    args = parser.parse_args()
    if args.heads and args.attention == "ssmax":
        parser.error("--heads compares LSSA/LSSAR heads with softmax: use --attention lssa or lssar")
    model, tokenizer = load(args.model, rope=args.rope)
    ids = tokenize(tokenizer, read_text(args.text))
    windows = blocks(ids[int(len(ids) * 0.1):], args.length, args.windows)[:args.windows]
    if args.heads:
        errors = head_errors(model, windows, args)
        for layer in range(model.config.num_hidden_layers):
            print(f"layer {layer}: head errors " + " ".join(f"{errors[layer, h]:.3f}" for h in
                                                              range(model.config.num_attention_heads)), flush=True)
        ranked = sorted(errors, key=errors.get, reverse=True)
        for k in args.worst:
            print(f"worst {k}: softmax_heads: {head_map(ranked[:k])}")
        return
    ppl = layer_ppl(model, windows, args)
    ranked = sorted(ppl, key=ppl.get, reverse=True)
    for k in args.worst:
        print(f"worst {k}: softmax_layers: {sorted(ranked[:k])}")


if __name__ == "__main__":
    main()
