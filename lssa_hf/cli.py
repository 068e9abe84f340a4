"""The ``lssa-hf`` command. Each subcommand lives in ``lssa_hf/commands/<name>.py`` and exposes
``add_parser(subparsers)``, which registers the parser and sets ``func``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["info", "compare", "eval", "extrapolate", "finetune"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lssa-hf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lssa_hf.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "accepts_extra", False):
        build_parser().parse_args(argv)  # report the unknown arguments the usual way
    return args.func(args, rest) if getattr(args, "accepts_extra", False) else args.func(args)


if __name__ == "__main__":
    sys.exit(main())
