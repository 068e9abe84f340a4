"""Train the length-extrapolation models: one Llama-architecture (RoPE) model per attention variant,
same data, seed and schedule. Logic lives in ``lssa_hf.pretrain``; this script only reads a preset.

    python recipes/extrapolation/pretrain.py --preset cpu-small
    accelerate launch recipes/extrapolation/pretrain.py --preset paper      # multi-GPU
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/extrapolation/pretrain.py --config X.yaml  # multi-CPU
"""

import argparse
from pathlib import Path

from lssa_hf.pretrain import ATTENTIONS, PretrainConfig, pretrain

CONFIGS = Path(__file__).parent / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    source.add_argument("--config", help="path of a YAML config (fields of lssa_hf.pretrain.PretrainConfig)")
    parser.add_argument("--variants", nargs="+", choices=ATTENTIONS, help="train only these (default: the config's)")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--max-steps", type=int, help="override the config's max_steps")
    args = parser.parse_args()
    path = CONFIGS / f"{args.preset}.yaml" if args.preset else Path(args.config)
    config = PretrainConfig.from_yaml(path, output_dir=args.output_dir, max_steps=args.max_steps)
    pretrain(config, args.variants)


if __name__ == "__main__":
    main()
