"""Diagnostic: which layers does swapping to LSSA/LSSAR hurt most? Swaps one layer at a time (every
other layer keeps softmax; no training) and prints the perplexity of each, then the layers ranked
worst as a ``softmax_layers`` list for a hybrid row: keep those on softmax.

    python recipes/adapt/probe_layers.py --p 8 --rope yarn:4 --worst 4 8

The text is training text (WikiText-2 validation from 10 % in), not the table's evaluation text, so
choosing layers from it does not tune on the test set.
"""

import argparse
import math
import time

import torch

from lssa_hf.data import blocks, read_text, tokenize
from lssa_hf.evaluation import mean_loss
from lssa_hf.models import DEFAULT_MODEL, load
from lssa_hf.patching import set_attention, unpatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--attention", default="lssar", choices=["lssa", "lssar", "ssmax"])
    parser.add_argument("--p", type=float, default=8.0)
    parser.add_argument("--rope", help="RoPE scaling set on the checkpoint first, e.g. yarn:4")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    parser.add_argument("--worst", type=int, nargs="+", default=[4, 8], help="sizes of the printed worst-layer lists")
    args = parser.parse_args()
    model, tokenizer = load(args.model, rope=args.rope)
    ids = tokenize(tokenizer, read_text(args.text))
    windows = blocks(ids[int(len(ids) * 0.1):], args.length, args.windows)[:args.windows]
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
    ranked = sorted(ppl, key=ppl.get, reverse=True)
    for k in args.worst:
        print(f"worst {k}: softmax_layers: {sorted(ranked[:k])}")


if __name__ == "__main__":
    main()
