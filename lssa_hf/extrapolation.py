"""Length extrapolation: next-token loss of causal LMs at context lengths T, 2T, ... 16T on held-out text.

Metric. For a context length L the same first ``n_tokens`` held-out tokens are cut into
non-overlapping windows of L, and each window is one forward pass. Two means are reported:

- ``all``:  mean loss over every predicted position of every window (the usual validation loss at
  sequence length L, as in the paper's Figure 1);
- ``last``: mean loss over the last T predictions of each window, i.e. tokens that see L-T..L-1
  tokens of context: the positions a model trained at T has never been trained on (at L = T both
  metrics coincide).

Models are checkpoints (folders, hub names, .gguf), evaluated with their own attention or with an
override ``PATH@softmax``, ``PATH@lssa``, ``PATH@lssar:P`` (e.g. an LSSA-trained model run as LSSAR),
and optionally with RoPE scaling ``PATH@softmax+yarn:2`` (``lssa_hf.rope``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluation import position_losses  # noqa: F401  (re-exported: part of this module's API)
from .settings import ATTENTIONS, DEFAULT_P, SOFTMAX

METRICS = ("all", "last")


@dataclass(frozen=True)
class ModelSpec:
    path: str
    variant: str | None = None  # None: the checkpoint's own attention
    p: float | None = None
    label: str | None = None
    rope: str | None = None  # RoPE scaling set after loading, e.g. "yarn:2"; None keeps the checkpoint's

    @classmethod
    def parse(cls, text: str, variant: str | None = None, p: float | None = None,
              rope: str | None = None) -> "ModelSpec":
        """``PATH[@VARIANT[:P]][+ROPE][=LABEL]``; ``variant``/``p``/``rope`` apply when the spec names none."""
        from .rope import parse_rope

        text, _, label = text.partition("=")
        text, plus, spec_rope = text.partition("+")
        rope = spec_rope if plus else rope
        parse_rope(rope)  # a bad value fails before any loading
        path, _, override = text.partition("@")
        if override:
            variant, _, p_text = override.partition(":")
            p = float(p_text) if p_text else p
        if variant is not None and variant not in ATTENTIONS:
            raise ValueError(f"Unknown attention {variant!r} in {text!r}: use one of {ATTENTIONS}.")
        return cls(path, variant, p, label or None, rope or None)

    def name(self) -> str:
        if self.label:
            return self.label
        base = Path(self.path.rstrip("/")).name or self.path
        base += f" + {self.rope}" if self.rope else ""
        if self.variant is None:
            return base if self.p is None else f"{base} (p={self.p:g})"
        suffix = f"{self.variant} p={self.p:g}" if self.variant == "lssar" and self.p is not None else self.variant
        return f"{base} as {suffix}"


def load_spec(spec: ModelSpec, device="cpu", dtype=torch.float32):
    """(model, tokenizer) with the spec's attention in force. LSSA checkpoints load as LSSA; a
    ``lssa-hf finetune`` output folder loads as its base model with its attention and merged adapter."""
    from .models import load_any
    from .patching import is_patched, set_attention, settings_of
    from .rope import apply_rope

    model, tokenizer = load_any(spec.path, dtype=dtype)
    apply_rope(model, spec.rope)
    if spec.variant == SOFTMAX:
        set_attention(model, SOFTMAX)
    elif spec.variant is not None or (spec.p is not None and is_patched(model)):
        current = settings_of(model)
        p = spec.p if spec.p is not None else (current.p if current else DEFAULT_P)
        set_attention(model, spec.variant or current.variant, p=p)
    return model.to(device).eval(), tokenizer


def attention_of(model) -> str:
    from .patching import settings_of

    settings = settings_of(model)
    if settings is None:
        return model.config._attn_implementation
    return settings.variant + (f" p={settings.p:g}" if settings.variant == "lssar" else "")


def summarise(per_position: torch.Tensor, train_length: int) -> dict:
    """{"all": mean over every position, "last": mean over the last ``train_length`` positions}."""
    return {"all": per_position.mean().item(), "last": per_position[-train_length:].mean().item()}


def context_profile(per_position: torch.Tensor) -> dict:
    """Loss by context size at one length, in bins 1, 2-4, 5-16, 17-64, 65-256, ...: how much of its
    window a model uses (a model whose loss stops falling after a few tokens has little to extrapolate)."""
    n = per_position.numel()  # prediction i sees i + 1 tokens
    starts = [1] + [4 ** k + 1 for k in range(12)]
    bins = [(a, min(b - 1, n)) for a, b in zip(starts, starts[1:]) if a <= n]
    return {"bins": [f"{a}-{b}" if a != b else str(a) for a, b in bins],
            "loss": [per_position[a - 1: b].mean().item() for a, b in bins]}


def extrapolate(specs: list, text: str, train_length: int, factors=(1, 2, 4, 8, 16), n_tokens: int | None = None,
                batch_tokens: int = 8192, device="cpu", dtype=torch.float32) -> dict:
    """Evaluate every spec at lengths ``train_length * factors`` on the same held-out tokens.

    Returns {"lengths": [...], "train_length": T, "n_tokens": {label: N}, "models": {label: {"attention": str,
    "all": [loss per length], "last": [...], "context": ``context_profile`` at the first length,
    "context_longest": the same at the last length}}};
    NaN where a model cannot take a length (e.g. learned absolute positions shorter than it).
    """
    from tqdm.auto import tqdm

    from .data import tokenize

    lengths = [train_length * f for f in factors]
    results = {"lengths": lengths, "train_length": train_length, "n_tokens": {}, "models": {}}
    for spec in tqdm(specs, desc="models"):
        model, tokenizer = load_spec(spec, device, dtype)
        ids = tokenize(tokenizer, text)
        budget = ids.numel() if n_tokens is None else min(n_tokens, ids.numel())
        budget -= budget % max(lengths)  # every length scores exactly the same tokens
        if budget == 0:
            raise ValueError(f"The held-out text has {ids.numel()} tokens for {spec.path}, fewer than one window "
                             f"of {max(lengths)}: give a longer text.")
        row = {"attention": attention_of(model), "all": [], "last": []}
        for length in lengths:
            try:
                per_position = position_losses(model, ids[:budget], length, batch_tokens, f"{spec.name()} L={length}")
                values = summarise(per_position, train_length)
                if length == lengths[0]:
                    row["context"] = context_profile(per_position)
                if length == lengths[-1] and length != lengths[0]:
                    row["context_longest"] = context_profile(per_position)
            except (IndexError, RuntimeError, ValueError) as error:  # e.g. GPT-2's 1024 learned positions
                print(f"warning: {spec.name()} cannot run at length {length}: {str(error).splitlines()[0]}")
                values = {"all": math.nan, "last": math.nan}
            for metric in METRICS:
                row[metric].append(values[metric])
        label = spec.name()
        results["models"][label] = row
        results["n_tokens"][label] = budget
        del model
    return results


def format_table(results: dict, metric: str = "all") -> str:
    """Markdown table: one row per model, one column per length, and loss(16T) / loss(T)."""
    lengths, t = results["lengths"], results["train_length"]
    head = "| model | attention | " + " | ".join(f"{n} ({n // t}T)" for n in lengths) + f" | {lengths[-1] // t}T / T |"
    rule = "|---|---|" + "---:|" * (len(lengths) + 1)
    rows = []
    for label, row in results["models"].items():
        values = row[metric]
        ratio = values[-1] / values[0] if values[0] and not math.isnan(values[0]) else math.nan
        cells = " | ".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in values)
        rows.append(f"| {label} | {row['attention']} | {cells} | {ratio:.3f} |")
    return "\n".join([head, rule, *rows])


def format_context_table(results: dict, key: str = "context") -> str:
    """Markdown table of loss by context size at the first length (see ``context_profile``), or at
    the last one with ``key="context_longest"``."""
    rows = {label: row[key] for label, row in results["models"].items() if key in row}
    if not rows:
        return ""
    bins = next(iter(rows.values()))["bins"]
    head = "| model | " + " | ".join(f"context {b}" for b in bins) + " |"
    rule = "|---|" + "---:|" * len(bins)
    lines = [f"| {label} | " + " | ".join(f"{v:.3f}" for v in c["loss"]) + " |" for label, c in rows.items()]
    return "\n".join([head, rule, *lines])


def plot(results: dict, path: str | Path, title: str = "") -> Path:
    """PNG of loss vs context length, one line per model; left: all positions, right: last T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, t = results["lengths"], results["train_length"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, metric, subtitle in zip(axes, METRICS, ("mean over all positions", f"mean over the last {t} positions")):
        for label, row in results["models"].items():
            ax.plot(lengths, row[metric], marker="o", label=label)
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n}\n({n // t}T)" for n in lengths])
        ax.set_xlabel("context length")
        ax.set_ylabel("validation loss")
        ax.set_title(subtitle, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_json(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))
