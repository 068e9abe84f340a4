"""``lssa-hf eval``: the full ``lm_eval`` command line with the ``lssa-hf`` model type and our offline
long-context tasks registered (lm-eval 0.4 has no plugin discovery). Every argument goes to lm_eval;
a run with ``--output_path`` also writes a score-vs-length table and plot there.

    lssa-hf eval --model lssa-hf --model_args pretrained=smollm2,variant=lssar --tasks passkey_sweep \\
        --device cpu --batch_size 1 --output_path results/
    lssa-hf eval ls tasks                  # any lm_eval subcommand: run (the default), ls, validate
    lssa-hf eval report results/ [--metrics exact_match token_perplexity]   # table + plot only
"""

from __future__ import annotations

import argparse
import sys


def harness_main(argv: list[str]) -> str | None:
    """Run lm_eval's own CLI on ``argv`` with our model type and task folder; returns --output_path."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from ..harness import TASKS_DIR
    from ..harness import model as _  # noqa: F401  registers "lssa-hf"

    setup_logging()
    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli = HarnessCLI()
        args = cli.parse_args()  # inserts "run" for the flat legacy form, exactly as lm_eval does
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run":
        fill_task_tokenizer(args)
    if hasattr(args, "include_path"):  # TaskManager takes a list: ours first, the user's can override
        args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    cli.execute(args)
    return getattr(args, "output_path", None) if getattr(args, "command", None) == "run" else None


def fill_task_tokenizer(args) -> None:
    """Synthetic tasks (RULER's niah_*, ours) size documents with the tokenizer named in the run's
    metadata, or else load ``pretrained`` by name from the hub. An alias ("smollm2") or a .gguf file
    is no hub name: save its tokenizer to a local folder once and name that folder instead."""
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    metadata = args.metadata if isinstance(args.metadata, dict) else {}
    pretrained = model_args.get("pretrained")
    if not isinstance(pretrained, str) or "tokenizer" in model_args or "tokenizer" in metadata:
        return
    from ..models import local_tokenizer

    folder = local_tokenizer(pretrained, model_args.get("gguf_file"))
    if folder is not None:
        args.metadata = {**metadata, "tokenizer": folder}


def report(argv: list[str]) -> int:
    from ..harness.report import DEFAULT_METRICS, write_report

    parser = argparse.ArgumentParser(prog="lssa-hf eval report",
                                     description="score-vs-length table (.md) and plot (.png) of lm_eval results")
    parser.add_argument("output_dir", help="folder searched recursively for lm_eval results_*.json")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    paths = write_report(args.output_dir, metrics=args.metrics)
    if not paths:
        print(f"No results of length-indexed tasks (name_<n> / name_<n>k) under {args.output_dir}.")
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


def run(args, rest: list[str]) -> int:
    if rest[:1] == ["report"]:
        return report(rest[1:])
    if not rest:
        print(__doc__)
        rest = ["--help"]
    output = harness_main(rest)
    if output and args.report:
        from ..harness.report import write_report

        for path in write_report(output):
            print(f"wrote {path}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", add_help=False, allow_abbrev=False,
                                   help="lm-evaluation-harness with the lssa-hf model type and offline "
                                   "long-context tasks (all lm_eval arguments pass through; `eval report DIR`)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write the score-vs-length table and plot next to the results")
    parser.set_defaults(func=run, accepts_extra=True)
