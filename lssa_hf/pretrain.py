"""Pretraining from random init with softmax, LSSA or LSSAR attention: the length-extrapolation recipe.

Every variant listed in a ``PretrainConfig`` gets the same tokenizer, token stream, initial weights,
batch order and schedule; only the attention differs. Runs on CPU, one GPU, or many through
``accelerate launch``. Checkpoints are written with ``save_pretrained``, so an LSSA model reloads as
LSSA (``lssa_hf`` imported) and plain ``from_pretrained`` is enough to evaluate it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .data import line_chunks, read_text
from .evaluation import held_out_loss
from .settings import ATTENTIONS, DEFAULT_P, check_attention

EOS = "<|endoftext|>"


@dataclass
class PretrainConfig:
    """One experiment. ``model`` holds LlamaConfig overrides (rotary positions, SwiGLU, RMSNorm)."""

    output_dir: str = "runs/extrapolation"
    variants: list = field(default_factory=lambda: list(ATTENTIONS))
    p: float = DEFAULT_P
    seed: int = 0
    train_text: list = field(default_factory=list)  # files, folders or dataset names; [] = built-in text
    eval_text: str | None = None  # held-out text, monitored at train_length during training
    train_split: str = "train"  # split used when a source is a dataset name
    eval_split: str = "validation"
    max_train_chars: int | None = None  # cap on training text (streams dataset names)
    tokenizer: str = "bpe:4096"  # "bpe:<vocab>" = byte-level BPE trained on the training text; or a name/path
    model: dict = field(default_factory=dict)
    train_length: int = 128
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum: int = 1
    max_steps: int = 400
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    mixed_precision: str = "no"  # accelerate: "no" | "bf16" | "fp16"
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # intermediate checkpoints every N steps (0 = final only)
    threads: int | None = None  # CPU threads per process (None = torch's default); 1 wins on a shared CPU

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "PretrainConfig":
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown settings {sorted(unknown)} in {path}.")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        for attention in self.variants:
            check_attention(attention)
        if isinstance(self.train_text, str):
            self.train_text = [self.train_text]
        for name in ("p", "lr", "min_lr_ratio", "weight_decay", "clip"):  # YAML reads "1e-3" as a string
            setattr(self, name, float(getattr(self, name)))


# ---------------------------------------------------------------- text and tokens


def read_corpus(sources: list, split: str, max_chars: int | None = None) -> str:
    """Concatenated text of ``sources`` (None/[] = built-in text), documents separated by EOS."""
    texts = [_read_one(s, split, max_chars) for s in sources] if sources else [read_text(None)]
    text = f"\n{EOS}\n".join(texts)
    return text if max_chars is None else text[:max_chars]


def _read_one(source: str, split: str, max_chars: int | None) -> str:
    if max_chars is None or Path(source).exists():
        return read_text(source, split=split)
    from datasets import load_dataset  # large hub corpora: stream only what is used

    name, _, config = source.partition(":")
    parts, size = [], 0
    for row in load_dataset(name, config or None, split=split, streaming=True):
        parts.append(row["text"])
        size += len(row["text"])
        if size >= max_chars:
            break
    return "\n".join(parts)


def build_tokenizer(spec: str, text: str):
    """A fast tokenizer: "bpe:<vocab>" trains byte-level BPE on ``text`` offline; else from_pretrained."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not spec.startswith("bpe:"):
        return AutoTokenizer.from_pretrained(spec)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(spec[4:]), special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(line_chunks(text), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def encode(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one int32 stream (no special tokens added)."""
    pieces = [torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=torch.int32)
              for piece in line_chunks(text)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def prepare_data(config: PretrainConfig):
    """(tokenizer, train ids, eval ids or None), cached under output_dir so every variant shares them."""
    from transformers import AutoTokenizer

    root = Path(config.output_dir)
    cache = root / "data.pt"
    source = {k: getattr(config, k) for k in ("train_text", "eval_text", "train_split", "eval_split",
                                              "max_train_chars", "tokenizer")}
    if cache.exists():
        cached = torch.load(cache)
        if cached["source"] == source:  # a cache from other text or another tokenizer is rebuilt
            return AutoTokenizer.from_pretrained(root / "tokenizer"), cached["train"], cached["eval"]
    train = read_corpus(config.train_text, config.train_split, config.max_train_chars)
    tokenizer = build_tokenizer(config.tokenizer, train)
    train_ids = encode(tokenizer, train)
    eval_ids = encode(tokenizer, read_text(config.eval_text, split=config.eval_split)) if config.eval_text else None
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.save({"source": source, "train": train_ids, "eval": eval_ids}, cache)
    return tokenizer, train_ids, eval_ids


def batches(ids: torch.Tensor, length: int, batch: int, seed: int):
    """Endless global batches (batch, length) of non-overlapping windows, reshuffled every epoch by a
    generator seeded with ``seed``: the same order for every variant."""
    n = ids.numel() // length
    if n < batch:
        raise ValueError(f"{ids.numel()} training tokens make {n} windows of {length}, fewer than one batch "
                         f"of {batch}: give more text or a smaller batch.")
    windows = ids[: n * length].view(n, length).long()
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield windows[order[i: i + batch]]


# ---------------------------------------------------------------- model


def build_model(config: PretrainConfig, tokenizer, attention: str):
    """A Llama-architecture decoder (rotary positions) from random init, seeded: identical weights for
    every attention, since attention has no parameters of its own."""
    from transformers import AutoModelForCausalLM, LlamaConfig, set_seed

    from .patching import set_attention

    values = dict(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  # RoPE needs no table, but keep the config from suggesting a 16x input is invalid
                  max_position_embeddings=32 * config.train_length)
    values.update(config.model)
    set_seed(config.seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**values), attn_implementation="sdpa")
    return set_attention(model, attention, p=config.p)


# ---------------------------------------------------------------- training


def schedule(config: PretrainConfig):
    """lr multiplier: linear warmup, then cosine decay to ``min_lr_ratio``."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_variant(config: PretrainConfig, attention: str, tokenizer, train_ids, eval_ids, accelerator=None):
    """Train one attention variant; returns the checkpoint folder."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                             gradient_accumulation_steps=config.grad_accum)
    out = Path(config.output_dir) / attention
    model = build_model(config, tokenizer, attention)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # no decay on norms
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=tuple(config.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config))
    # the scheduler stays unprepared: accelerate would step it once per process; we step once per update
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * world
    data = batches(train_ids, config.train_length, global_batch, config.seed)

    log = {"attention": attention, "p": config.p, "steps": [], "train_loss": [], "eval": []}
    bar = tqdm(range(config.max_steps), desc=f"pretrain {attention}", disable=not accelerator.is_main_process)
    model.train()
    start = time.time()
    for step in bar:
        total = 0.0
        for _ in range(config.grad_accum):
            x = next(data)[rank::world].to(accelerator.device)  # this process's share of the global batch
            with accelerator.accumulate(model):
                loss = model(x, labels=x).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip)
                optimizer.step()
                optimizer.zero_grad()
            total += accelerator.reduce(loss.detach(), "mean").item() / config.grad_accum  # all ranks' mean
        scheduler.step()
        if not math.isfinite(total):
            raise FloatingPointError(f"{attention}: training loss is {total} at step {step}.")
        log["steps"].append(step + 1)
        log["train_loss"].append(round(total, 4))
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        last = step + 1 == config.max_steps
        if eval_ids is not None and config.eval_every and ((step + 1) % config.eval_every == 0 or last):
            value = held_out_loss(model, eval_ids, config.train_length, config.batch_size, config.eval_batches,
                                  accelerator.device)
            log["eval"].append({"step": step + 1, "loss": round(value, 4)})
            if accelerator.is_main_process:
                bar.write(f"{attention} step {step + 1}: held-out loss @ {config.train_length} = {value:.4f}")
        if config.save_every and (step + 1) % config.save_every == 0 and not last:
            _save(accelerator, model, tokenizer, out / f"step-{step + 1}", config, log)
    log["seconds"] = round(time.time() - start, 1)
    _save(accelerator, model, tokenizer, out, config, log)
    return out


def _save(accelerator, model, tokenizer, folder: Path, config: PretrainConfig, log: dict) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder)  # LSSA settings go into config.json
        tokenizer.save_pretrained(folder)
        (folder / "pretrain.json").write_text(json.dumps({"config": asdict(config), "log": log}, indent=1))


def pretrain(config: PretrainConfig, variants: list | None = None) -> dict:
    """Train every variant of ``config`` (or ``variants``); returns {attention: checkpoint folder}."""
    from accelerate import Accelerator

    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum)
    with accelerator.main_process_first():  # one process tokenizes, the others read the cache
        tokenizer, train_ids, eval_ids = prepare_data(config)
    if accelerator.is_main_process:
        print(f"{train_ids.numel():,} training tokens, {0 if eval_ids is None else eval_ids.numel():,} held-out "
              f"tokens, vocab {len(tokenizer)}; {config.max_steps} steps x {config.batch_size * config.grad_accum * accelerator.num_processes}"
              f" x {config.train_length} tokens")
    paths = {}
    for attention in variants or config.variants:
        accelerator.free_memory()
        paths[attention] = train_variant(config, attention, tokenizer, train_ids, eval_ids, accelerator)
        if accelerator.is_main_process:
            print(f"{attention}: saved to {paths[attention]}")
    return paths
