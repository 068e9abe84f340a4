"""``lssa-hf finetune``: adapt a pretrained checkpoint to LSSA/LSSAR with LoRA (recipe config YAML
plus command-line overrides). Several processes: ``accelerate launch -m lssa_hf.cli finetune ...``."""

from __future__ import annotations

import argparse
import os

import yaml

from ..settings import ATTENTIONS


def overrides(args) -> dict:
    """The named flags (None where not given: the YAML value stays)."""
    return dict(model=args.model, attention=args.attention, p=args.p, output_dir=args.output_dir,
                train_text=args.train_text, eval_text=args.eval_text, max_steps=args.max_steps,
                block_size=args.block_size, warm_start=args.warm_start, merge=args.merge, seed=args.seed,
                head_temperature=args.head_temperature, rope=args.rope)


def settings(args) -> dict:
    """``--set KEY=VALUE`` pairs, values read as YAML (numbers, lists, null)."""
    values = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}.")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return values


def run(args) -> int:
    from ..finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_yaml(args.config, settings(args), **overrides(args))
    result = finetune(config)
    if int(os.environ.get("RANK", 0)) == 0:  # one summary line under accelerate launch
        print(f"{config.attention}: eval loss {result['eval_loss']:.4f} (ppl {result['eval_ppl']:.2f}) after "
              f"{result['steps']} steps, {result['tokens']:,} tokens, {result['seconds']:.0f} s -> {config.output_dir}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="LoRA-adapt a checkpoint to LSSA/LSSAR (recipes/adapt)")
    parser.add_argument("--config", help="YAML config (fields of lssa_hf.finetune.FinetuneConfig); "
                        "e.g. recipes/adapt/configs/smollm2.yaml")
    parser.add_argument("--model", help="hub name, folder, .gguf file or 'smollm2'")
    parser.add_argument("--attention", choices=ATTENTIONS)
    parser.add_argument("--p", type=float, help="LSSAR re-weighting power")
    parser.add_argument("--rope", help="RoPE scaling set on load and trained with: TYPE:FACTOR[:ORIGINAL], e.g. "
                        "yarn:2 (types: yarn, dynamic, linear, longrope, llama3; 'default' removes scaling)")
    parser.add_argument("--output-dir")
    parser.add_argument("--train-text", nargs="+", help="files, folders or dataset names[:config]")
    parser.add_argument("--eval-text", help="held-out text (default: the tail of the training text)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--warm-start", action=argparse.BooleanOptionalAction, help="attention-transfer warm start on/off")
    parser.add_argument("--head-temperature", action=argparse.BooleanOptionalAction,
                        help="learn a per-head multiplier of LSSA's length scale (own LR: temperature_lr)")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, help="also save a merged LSSA checkpoint")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="any other config field, e.g. lr=1e-3 or "
                        "'p_schedule=[[0, 3], [100, 3], [150, 6]]'")
    parser.set_defaults(func=run)

