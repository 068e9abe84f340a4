"""Training data: text sources -> token stream -> fixed-length blocks in ``datasets.Dataset``s."""

from __future__ import annotations

import torch

from ..data import line_chunks, read_text
from .config import FinetuneConfig


def token_stream(tokenizer, sources: list, split: str, text_field: str = "text") -> torch.Tensor:
    """All tokens of ``sources`` (files, folders, dataset names; [] = built-in text) as one stream,
    documents separated by EOS where the tokenizer has one."""
    from datasets import Dataset

    texts = [read_text(s, split=split, text_field=text_field) for s in sources] if sources else [read_text(None)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        pieces = Dataset.from_dict({"text": list(line_chunks(text, 1 << 16))})
        tokens = pieces.map(lambda b: tokenizer(b["text"], add_special_tokens=False), batched=True,
                            remove_columns=["text"], desc="tokenize", keep_in_memory=True)
        for row in tokens["input_ids"]:
            ids.extend(row)
        ids.extend(eos)
    return torch.tensor(ids, dtype=torch.long)


def as_dataset(blocks: torch.Tensor):
    """A torch-formatted Dataset of causal-LM examples (labels = inputs; the model shifts them)."""
    from datasets import Dataset

    rows = blocks.tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows}).with_format("torch")


def build_datasets(config: FinetuneConfig, tokenizer):
    """(train, validation) Datasets of ``block_size`` blocks.

    Without ``eval_text`` the validation blocks are the *last* ones of the stream, not a random
    sample, so no validation block has a neighbour (same document, adjacent text) in training.
    """
    ids = token_stream(tokenizer, config.train_text, config.train_split, config.text_field)
    if config.max_train_tokens:
        ids = ids[: config.max_train_tokens]
    n = ids.numel() // config.block_size
    blocks = ids[: n * config.block_size].view(n, config.block_size)
    if config.eval_text is not None:
        held = token_stream(tokenizer, [config.eval_text], config.eval_split, config.text_field)
        m = held.numel() // config.block_size
        train, valid = blocks, held[: m * config.block_size].view(m, config.block_size)
    else:
        m = max(1, round(n * config.validation_fraction))
        train, valid = blocks[: n - m], blocks[n - m:]
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"{ids.numel()} tokens make {n} blocks of {config.block_size}: too few for a training and a "
                         "validation split; give more text or a smaller block_size.")
    return as_dataset(train), as_dataset(valid[: config.max_eval_blocks])
