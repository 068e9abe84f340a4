"""Adapt a pretrained checkpoint to LSSA/LSSAR with LoRA: a thin wrapper of ``lssa-hf finetune``
(logic in ``lssa_hf.finetune``), handy under ``accelerate launch``.

    python recipes/adapt/finetune.py --config recipes/adapt/configs/smollm2.yaml --attention lssar
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/adapt/finetune.py --config ...
"""

import sys

from lssa_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
