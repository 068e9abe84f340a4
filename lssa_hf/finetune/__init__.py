"""Adapt pretrained checkpoints to LSSA/LSSAR with LoRA (peft + transformers Trainer; accelerate for
several processes), with an optional attention-transfer warm start.

    from lssa_hf.finetune import FinetuneConfig, finetune, load_adapted
    finetune(FinetuneConfig(model="smollm2", attention="lssar", train_text=["wiki.valid.txt"]))
    model, tokenizer = load_adapted("runs/adapt/lssar")
"""

from ..models import load_adapted
from .config import FinetuneConfig
from .train import adapt, finetune

__all__ = ["FinetuneConfig", "adapt", "finetune", "load_adapted"]
