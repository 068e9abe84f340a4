"""Text sources for evaluation and training: local files or folders, Hugging Face datasets, or an
offline default that ships with Python itself."""

from __future__ import annotations

from pathlib import Path

import torch

GUTENBERG_START, GUTENBERG_END = "*** START OF", "*** END OF"


def normalise(text: str) -> str:
    """Drop a UTF-8 BOM, use \\n line endings and cut a Project Gutenberg header/footer if present."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = text.find(GUTENBERG_START)
    if start != -1:
        text = text[text.find("\n", start) + 1:]
        end = text.find(GUTENBERG_END)
        text = text[:end] if end != -1 else text
    return text.strip() + "\n"


def builtin_text() -> str:
    """Offline default: the Python documentation topics shipped with every CPython (~450K chars)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(source: str | None = None, split: str = "test", text_field: str = "text") -> str:
    """Text from a file, a folder of .txt files, a dataset name ("name" or "name:config"), or the
    built-in default when ``source`` is None."""
    if source is None:
        return builtin_text()
    path = Path(source)
    if path.is_file():
        return normalise(path.read_text(encoding="utf-8", errors="replace"))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".raw", ".md"})
        if not files:
            raise FileNotFoundError(f"No .txt/.raw/.md files under {path}.")
        return "\n\n".join(normalise(p.read_text(encoding="utf-8", errors="replace")) for p in files)
    if path.suffix or "/" in source and Path(source.split("/")[0]).exists():
        raise FileNotFoundError(f"{source} does not exist.")
    from datasets import load_dataset  # a hub dataset name, e.g. "wikitext:wikitext-2-raw-v1"

    name, _, config = source.partition(":")
    rows = load_dataset(name, config or None, split=split)
    return "\n".join(rows[text_field])


def line_chunks(text: str, size: int = 1 << 20):
    """Pieces of about ``size`` characters cut after a newline: fast tokenizers are slow on one huge
    string, and cutting at line ends keeps the tokenisation of every line intact."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D tensor (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def blocks(token_ids: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, length) windows of a token stream; raises if the text is too short."""
    n = token_ids.numel() // length
    if n == 0:
        raise ValueError(f"The text has {token_ids.numel()} tokens, fewer than one window of {length}: "
                         "give a longer text (--text).")
    n = n if limit is None else min(n, limit)
    return token_ids[: n * length].view(n, length)
