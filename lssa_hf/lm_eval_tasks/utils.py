"""Data builders and scorers for the offline long-context tasks (lm-eval ``custom_dataset`` style).

Every builder is called by the harness as ``f(**task_metadata, **dataset_kwargs)``: the YAML's
``dataset_kwargs`` give ``seq_length``; the run's metadata (``--metadata`` JSON, which the harness
merges with ``--model_args``) gives the tokenizer (``tokenizer=`` or ``pretrained=``) that sizes the
documents, and the optional knobs documented on each builder. Unknown keys are ignored.
"""

from __future__ import annotations

import functools
import os
import random
import re

import datasets

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
MULTI_NEEDLE = "The pass key for the {name} door is {key}. Remember it. "
MULTI_QUESTION = "\nWhat is the pass key for the {name} door? The pass key for the {name} door is"
DOORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden",
         "brown", "pink", "grey", "violet", "iron", "wooden"]
TEXT_ENV = "LSSA_EVAL_TEXT"  # default text of the ppl_* tasks when no ``text`` metadata is given


# -- tokenizer ---------------------------------------------------------------------------------------
def get_tokenizer(meta: dict):
    """The tokenizer named by the run's metadata: ``tokenizer`` (name, path or object) or ``pretrained``."""
    source = meta.get("tokenizer") or meta.get("pretrained")
    if source is None:
        raise ValueError("These tasks size their documents in tokens and need the model's tokenizer: run with "
                         "--model_args pretrained=... or pass --metadata '{\"tokenizer\": \"<name or path>\"}'.")
    if not isinstance(source, str):  # a tokenizer (or a model) object passed through TaskManager metadata
        return source if hasattr(source, "encode") else _load_tokenizer(source.config._name_or_path, None)
    return _load_tokenizer(source, meta.get("gguf_file"))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    from lssa_hf.models import resolve

    name, extra = resolve(source)
    if gguf_file:
        extra = {"gguf_file": gguf_file}
    return AutoTokenizer.from_pretrained(name, **extra)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _dataset(rows: list[dict]) -> dict:
    return {"test": datasets.Dataset.from_list(rows)}


def depth_of(i: int) -> float:
    """Van der Corput sequence 0, .5, .25, .75, ...: any prefix of the documents (``--limit``) spreads
    its needles over the whole depth range."""
    depth, base = 0.0, 0.5
    while i:
        depth, i, base = depth + base * (i & 1), i >> 1, base / 2
    return depth


# -- haystacks ---------------------------------------------------------------------------------------
def haystack(tokenizer, seq_length: int, needles: list[tuple[float, str]], question: str) -> tuple[str, int]:
    """INTRO + filler with each needle at its depth + question, as long as fits in ``seq_length`` tokens
    (within one filler sentence group of it). Returns (text, tokens)."""
    unit = n_tokens(tokenizer, FILLER)
    fixed = n_tokens(tokenizer, INTRO + "".join(n for _, n in needles) + question)
    units = max(0, (seq_length - fixed) // unit)
    while True:
        slots = [FILLER] * units
        for depth, needle in sorted(needles, key=lambda x: -x[0]):  # deepest first keeps indices valid
            slots.insert(round(depth * units), needle)
        text = INTRO + "".join(slots) + question
        length = n_tokens(tokenizer, text)
        if length <= seq_length or units == 0:
            return text, length
        units -= 1


def passkey(seq_length: int, num_samples: int = 10, seed: int = 0, **meta) -> dict:
    """Classic passkey retrieval: a random 5-digit key at depth ``depth_of(i)`` in repeated filler.
    Knobs: num_samples (documents per length), seed."""
    tokenizer = get_tokenizer(meta)
    rows = []
    for i in range(int(num_samples)):
        rng = random.Random(f"passkey-{seed}-{seq_length}-{i}")
        key = str(rng.randint(10000, 99999))
        depth = depth_of(i)
        text, length = haystack(tokenizer, seq_length, [(depth, NEEDLE.format(key=key))], QUESTION)
        rows.append({"input": text, "target": key, "depth": depth, "n_tokens": length})
    return _dataset(rows)


def multikey(seq_length: int, num_samples: int = 10, num_keys: int = 4, seed: int = 0, **meta) -> dict:
    """Several doors with their own keys at random depths; the question asks for one of them, the
    others are distractors. Knobs: num_samples, num_keys (<= 16), seed."""
    tokenizer = get_tokenizer(meta)
    rows = []
    for i in range(int(num_samples)):
        rng = random.Random(f"multikey-{seed}-{seq_length}-{i}")
        names = rng.sample(DOORS, int(num_keys))
        keys = [str(rng.randint(10000, 99999)) for _ in names]
        depths = [rng.random() for _ in names]
        asked = rng.randrange(len(names))
        needles = [(d, MULTI_NEEDLE.format(name=n, key=k)) for d, n, k in zip(depths, names, keys)]
        text, length = haystack(tokenizer, seq_length, needles, MULTI_QUESTION.format(name=names[asked]))
        rows.append({"input": text, "target": keys[asked], "depth": depths[asked], "n_tokens": length})
    return _dataset(rows)


def process_generated_key(doc: dict, results: list[str]) -> dict:
    """Exact match of the first number generated after the prompt with the key."""
    found = re.search(r"\d+", results[0])
    return {"exact_match": float(found is not None and found.group() == doc["target"])}


def process_key_loglikelihood(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """Log-likelihood of " <key>" after the prompt, and whether greedy decoding would produce it."""
    logprob, greedy = results[0]
    return {"key_logprob": logprob, "acc": float(greedy)}


# -- perplexity by context length ---------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _read(source: str | None) -> str:
    from lssa_hf.data import read_text

    return read_text(source)


def ppl_windows(seq_length: int, num_windows: int = 5, text: str | None = None, **meta) -> dict:
    """The first ``num_windows`` non-overlapping windows of exactly ``seq_length`` tokens of a text:
    ``text`` metadata (file, folder or dataset name[:config]), else $LSSA_EVAL_TEXT, else Python's own
    documentation (offline). Each window is cut at token boundaries of the original text."""
    tokenizer = get_tokenizer(meta)
    source = text or os.environ.get(TEXT_ENV) or None
    full = _read(source)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets, total = enc["offset_mapping"], len(enc["input_ids"])
    count = min(int(num_windows), total // seq_length)
    if count == 0:
        raise ValueError(f"{source or 'the built-in text'} has {total} tokens, fewer than one window of "
                         f"{seq_length}: point --metadata '{{\"text\": ...}}' or ${TEXT_ENV} at a longer text.")
    rows = []
    for i in range(count):
        start, end = i * seq_length, (i + 1) * seq_length
        window = full[offsets[start][0]:offsets[end - 1][1]]
        rows.append({"text": window, "n_tokens": n_tokens(tokenizer, window), "source": source or "builtin"})
    return _dataset(rows)


def process_perplexity(doc: dict, results: list[float]) -> dict:
    """Token, word and byte perplexity of one window (aggregated over windows as total NLL / total units)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    nbytes = len(doc["text"].encode("utf-8"))
    return {"token_perplexity": (loglikelihood, doc["n_tokens"]),
            "word_perplexity": (loglikelihood, words),
            "bits_per_byte": (loglikelihood, nbytes)}
