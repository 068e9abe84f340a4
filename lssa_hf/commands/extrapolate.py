"""``lssa-hf extrapolate``: validation loss of causal LMs at context lengths T, 2T, 4T, 8T, 16T on
held-out text, as a markdown table and a PNG plot (the paper's Figure 1)."""

from __future__ import annotations

import json
from pathlib import Path

from ..extrapolation import METRICS, ModelSpec
from ..settings import ATTENTIONS


def default_train_length(spec: ModelSpec) -> int:
    """T recorded by ``lssa_hf.pretrain`` in the checkpoint's pretrain.json."""
    record = Path(spec.path) / "pretrain.json"
    if not record.exists():
        raise SystemExit(f"{spec.path} has no pretrain.json: give the training length with --train-length.")
    return json.loads(record.read_text())["config"]["train_length"]


def run(args) -> int:
    import torch

    from ..data import read_text
    from ..extrapolation import extrapolate, format_context_table, format_table, plot, save_json

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [ModelSpec.parse(m, args.variant, args.p, args.rope) for m in args.models]
    train_length = args.train_length or default_train_length(specs[0])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    text = read_text(args.text, split=args.split)
    results = extrapolate(specs, text, train_length, args.factors, args.tokens, args.batch_tokens, device, dtype)
    results["text"] = args.text or "built-in (Python docs)"
    tokens = sorted(set(results["n_tokens"].values()))
    print(f"\ntext: {results['text']}   T = {train_length}   held-out tokens per length: "
          f"{', '.join(f'{n:,}' for n in tokens)}")
    for metric in ([args.metric] + [m for m in METRICS if m != args.metric]):
        what = "all positions" if metric == "all" else f"last {train_length} positions of each window"
        print(f"\nvalidation loss, mean over {what}:\n{format_table(results, metric)}")
    print(f"\nvalidation loss at length {results['lengths'][0]} by context size (tokens seen), i.e. how much of "
          f"its window each model uses:\n{format_context_table(results)}")
    longest = format_context_table(results, "context_longest")
    if longest:
        print(f"\nvalidation loss at length {results['lengths'][-1]} by context size (tokens seen):\n{longest}")
    if args.json:
        save_json(results, args.json)
    if args.plot:
        print(f"\nplot: {plot(results, args.plot, args.title)}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("extrapolate", help="loss at T..16T context: length extrapolation table + plot",
                                   description=__doc__)
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="checkpoint folder, hub name, .gguf or `lssa-hf finetune` output folder, optionally "
                             "PATH@ATTENTION[:P] (softmax, lssa, lssar[:P], ...) to override its attention, "
                             "PATH...+yarn:2 for RoPE scaling and PATH...=LABEL to name it")
    parser.add_argument("--variant", choices=ATTENTIONS, help="attention override for models without @...")
    parser.add_argument("--p", type=float, help="LSSAR power override for models without @...:P")
    parser.add_argument("--rope", help="RoPE scaling for models without +ROPE, e.g. yarn:2 (lssa_hf.rope)")
    parser.add_argument("--text", default=None, help="held-out text: file, folder or dataset name[:config] "
                        "(default: Python's documentation, offline)")
    parser.add_argument("--split", default="test", help="split when --text is a dataset name")
    parser.add_argument("--train-length", type=int, help="T (default: from the first model's pretrain.json)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="lengths = T x factors")
    parser.add_argument("--tokens", type=int, default=32768,
                        help="held-out tokens scored at every length (the same tokens for each length)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward (windows are batched)")
    parser.add_argument("--metric", choices=METRICS, default="all", help="table printed first: all positions "
                        "or the last T positions of each window (both are always computed)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy CPU)")
    parser.add_argument("--plot", help="write a PNG of loss vs context length here")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.set_defaults(func=run)
