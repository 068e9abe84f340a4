"""Next-token losses of causal LMs, one implementation for every command and recipe: per-position
losses (``token_losses``, ``position_losses``), window means (``mean_loss``), the held-out loss of
pretraining (``held_out_loss``) and the attention comparison table (``compare``, ``format_table``).

Memory: the (batch, L, vocab) logits of a long window dwarf the model (32K tokens x 49K vocab is
6 GB in fp32, twice that with the float copy a loss makes). ``token_losses`` therefore applies the
output head and the cross-entropy to the final hidden states in slices of ``LOSS_SLICE`` positions,
inside the model's own forward (a hook on its decoder body, so autocast and peft apply as usual),
and asks the model for its last position's logits only. That one row checks the reconstruction:
a model whose logits are not ``head(hidden)`` up to a known soft-cap or scale (Gemma2's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``) is detected and
evaluated from its full logits instead, with a warning that says why.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import weakref

import torch
import torch.nn.functional as F

from .settings import ATTENTIONS, DEFAULT_P

logger = logging.getLogger(__name__)

LOSS_SLICE = 1024  # positions per output-head + cross-entropy call
_FULL_LOGITS = weakref.WeakKeyDictionary()  # model -> why its losses come from its full logits


def inner_model(model):
    """The transformers model inside DDP and peft wrappers (or the model itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cheap_forward_kwargs(model) -> dict:
    """Forward kwargs that skip the KV cache and most of the LM head where the model allows it."""
    forward = inner_model(model).forward
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
    return {"use_cache": False, **extra}


def _logit_transform(inner):
    """What the model does to ``head(hidden)``: a function of the logits (identity if nothing known)."""
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(inner, "logit_scale", None)  # Cohere multiplies
    divisor = getattr(config, "logits_scaling", None)  # Granite divides

    def transform(logits):
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if isinstance(scale, (int, float)):
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        return logits
    return transform


def _sliced_parts(inner):
    """(body, head, transform) for sliced losses, or a string saying why the full logits are needed."""
    if inner in _FULL_LOGITS:
        return _FULL_LOGITS[inner]
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    body = getattr(inner, "base_model", inner)
    reason = None
    if head is None or body is inner:
        reason = f"{type(inner).__name__} has no separate decoder body and output head"
    elif "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        reason = f"{type(inner).__name__}.forward has no logits_to_keep"
    if reason is None:
        return body, head, _logit_transform(inner)
    logger.info("%s: its losses come from its full (L x vocab) logits.", reason)
    _FULL_LOGITS[inner] = reason
    return reason


def _cross_entropy(logits_of, ids: torch.Tensor) -> torch.Tensor:
    """(B, L-1) float32 losses of predicting ids[:, 1:], from ``logits_of(start, stop)`` slices."""
    n = ids.shape[1] - 1
    targets = ids.long()
    losses = torch.empty(ids.shape[0], n, dtype=torch.float32, device=ids.device)
    for start in range(0, n, LOSS_SLICE):
        stop = min(start + LOSS_SLICE, n)
        losses[:, start:stop] = F.cross_entropy(logits_of(start, stop).float().transpose(1, 2),
                                                targets[:, start + 1: stop + 1], reduction="none")
    return losses


def _matches(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    tol = 1e-3 if theirs.dtype in (torch.float32, torch.float64) else 3e-2
    theirs = theirs.float()
    return bool(torch.allclose(ours.float(), theirs, rtol=tol, atol=tol * max(1.0, theirs.abs().max().item())))


@torch.no_grad()
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss at every position of each row of ``ids`` (B, L) as a (B, L-1) float32 tensor:
    the per-token terms of ``model(ids, labels=ids).loss``, without the (B, L, vocab) logits."""
    inner = inner_model(model)
    parts = _sliced_parts(inner)
    if isinstance(parts, str):
        logits = model(ids, use_cache=False).logits
        return _cross_entropy(lambda start, stop: logits[:, start:stop], ids)
    body, head, transform = parts
    found = {}

    def hook(module, args, output):
        hidden = output[0]  # last_hidden_state of a ModelOutput or a tuple
        found["losses"] = _cross_entropy(lambda start, stop: transform(head(hidden[:, start:stop])), ids)
        found["last"] = transform(head(hidden[:, -1:]))

    handle = body.register_forward_hook(hook)
    try:
        logits = model(ids, **cheap_forward_kwargs(inner)).logits
    finally:
        handle.remove()
    if "losses" not in found or not _matches(found["last"], logits[:, -1:]):
        reason = (f"{type(inner).__name__}'s logits are not its output head applied to its decoder's last hidden "
                  "state (a logit transform lssa_hf does not know)")
        logger.warning("%s: computing its losses from the full (L x vocab) logits, which needs more memory.", reason)
        _FULL_LOGITS[inner] = reason
        return token_losses(model, ids)
    return found["losses"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, desc: str = "") -> float:
    """Mean next-token loss over every position of each window (one window per forward), averaged
    over the windows."""
    from tqdm.auto import tqdm

    device = _device(model)
    losses = [token_losses(model, w[None].to(device)).mean().item() for w in tqdm(windows, desc=desc, leave=False)]
    return sum(losses) / len(losses)


@torch.no_grad()
def position_losses(model, ids: torch.Tensor, length: int, batch_tokens: int = 8192, desc: str = "") -> torch.Tensor:
    """Mean next-token loss at each of the ``length - 1`` predicted positions over the windows of
    ``ids`` (non-overlapping, length ``length``), as float64."""
    from tqdm.auto import tqdm

    n = ids.numel() // length
    windows = ids[: n * length].view(n, length)
    device = _device(model)
    total = torch.zeros(length - 1, dtype=torch.float64)
    for chunk in tqdm(windows.split(max(1, batch_tokens // length)), desc=desc, leave=False):
        total += token_losses(model, chunk.to(device)).sum(0).double().cpu()
    return total / n


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, length: int, batch: int, n_batches: int, device) -> float:
    """Mean next-token loss on the first ``n_batches`` batches of held-out windows at ``length``
    (the mean of the batch means), in eval mode."""
    n = min(ids.numel() // length, batch * n_batches)
    windows = ids[: n * length].view(n, length).long()
    was_training = model.training
    model.eval()
    try:
        losses = [token_losses(model, w.to(device)).mean().item() for w in windows.split(batch)]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- attention comparison (``lssa-hf compare``)


DEFAULT_ROWS = ["softmax", "softmax+yarn:2", "lssa", "lssar"]


def parse_row(text: str, error=ValueError) -> tuple[str, str | None]:
    """``ATTENTION[+ROPE]`` (e.g. "lssar+yarn:2") -> (attention, rope spec or None); an unknown
    attention raises ``error`` (the command line exits), a bad RoPE value ``parse_rope``'s ValueError."""
    from .rope import parse_rope

    attention, _, rope = text.partition("+")
    if attention not in ATTENTIONS:
        raise error(f"Unknown attention {attention!r} in {text!r}: use one of {ATTENTIONS}, optionally "
                         "with +ROPE such as softmax+yarn:2.")
    parse_rope(rope or None)  # a bad RoPE value fails before any measurement
    return attention, rope or None


def compare(model, tokenizer, text: str, lengths: list[int], rows: list[str], p: float = DEFAULT_P,
            windows: int = 2) -> dict:
    """{(row, length): mean loss} of one checkpoint with each row's attention swapped in (no training).
    A row is ``ATTENTION[+ROPE]``: "softmax" the checkpoint's own attention, ``+yarn:2`` RoPE scaling
    set on a copy of the model (the checkpoint itself stays as loaded)."""
    from tqdm.auto import tqdm

    from .data import blocks, tokenize
    from .patching import set_attention
    from .rope import apply_rope

    parsed = [parse_row(row) for row in rows]
    ids = tokenize(tokenizer, text)
    results = {}
    bar = tqdm(total=len(rows) * len(lengths), desc="compare")
    for row, (attention, rope) in zip(rows, parsed):
        row_model = apply_rope(copy.deepcopy(model), rope) if rope else model
        set_attention(row_model, attention, p=p)
        for length in lengths:
            bar.set_postfix_str(f"{row} @ {length}")
            results[row, length] = mean_loss(row_model, blocks(ids, length, windows), f"{row} L={length}")
            bar.update()
    bar.close()
    return results


def format_table(results: dict, lengths: list[int], rows: list[str]) -> str:
    """Markdown: one row per attention, loss (perplexity) per length."""
    head = "| attention | " + " | ".join(f"loss@{n} (ppl)" for n in lengths) + " |"
    rule = "|---" * (len(lengths) + 1) + "|"
    lines = [
        f"| {r} | " + " | ".join(f"{results[r, n]:.3f} ({math.exp(results[r, n]):.1f})" for n in lengths) + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *lines])
