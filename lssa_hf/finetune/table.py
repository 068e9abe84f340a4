"""The adaptation results table: perplexity by context length of a checkpoint with softmax, with
LSSA/LSSAR swapped in, and LoRA-adapted, plus each row's training cost.

Rows are declared in YAML; every trained row shares ``base`` (same data, steps, LoRA, seed). A row
whose ``p`` is a list trains one model per value and reports the one with the lowest validation loss
at the training length ("best p"). Every trained model and every measured cell is cached under
``output_dir``, so an interrupted table resumes where it stopped and rows can be added later.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..data import blocks, read_text, tokenize
from ..evaluation import mean_loss
from ..models import DEFAULT_MODEL, RESULT, load, load_adapted
from ..patching import set_attention
from ..rope import apply_rope
from ..settings import DEFAULT_P, SOFTMAX
from .config import FinetuneConfig
from .data import build_datasets
from .train import calibrate, finetune, total_cost


@dataclass
class TableConfig:
    output_dir: str = "runs/adapt/table"
    base: dict = field(default_factory=dict)  # FinetuneConfig fields shared by every trained row
    rows: list = field(default_factory=list)  # {name, attention, p, train, warm_start, ...FinetuneConfig overrides}
    eval_text: dict = field(default_factory=dict)  # column label -> file/folder/dataset name
    lengths: list = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    eval_tokens: int = 32768  # the same tokens at every length (at least one window each)
    eval_skip: float = 0.1  # fraction of each eval text skipped first: a book opens with its contents list
    passkey_lengths: list = field(default_factory=list)  # passkey exact match (lm_eval_tasks.passkey) here
    passkey_docs: int = 2  # documents per passkey length (needles at depths 0, .5, .25, ...)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "TableConfig":
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown table settings {sorted(unknown)} in {path}.")
        return cls(**values)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def run_folder(table: TableConfig, extra: dict, p: float) -> Path:
    """Where a trained model lives, named by what distinguishes it, so rows that need the same model
    (e.g. "LSSAR p=15" and the p sweep of "best p") share one training run."""
    name = f"{extra.get('attention', 'lssar')}" + (f"-p{p:g}" if extra.get("attention", "lssar") == "lssar" else "")
    name += "-warm" if extra.get("warm_start") else ""
    rest = {k: v for k, v in extra.items() if k not in ("attention", "warm_start")}
    if rest:
        name += "-" + hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
    return Path(table.output_dir) / "runs" / name


# row keys that are not FinetuneConfig fields; ``eval_rope``: RoPE scaling set on the trained model only
# for evaluation, so the row shares its training run with the row without it
ROW_ONLY = ("name", "train", "p", "eval_rope")


def row_configs(table: TableConfig, row: dict) -> list[FinetuneConfig]:
    """One FinetuneConfig per p value of a trained row."""
    extra = {k: v for k, v in row.items() if k not in ROW_ONLY}
    ps = row.get("p", DEFAULT_P)
    ps = ps if isinstance(ps, list) else [ps]
    return [FinetuneConfig(**{**table.base, **extra, "p": p, "output_dir": str(run_folder(table, extra, p))})
            for p in ps]


def train_row(table: TableConfig, row: dict) -> tuple[Path, dict]:
    """Train (or reuse) every model of a row; returns (folder of the chosen one, its finetune.json)."""
    runs = []
    for config in row_configs(table, row):
        done = Path(config.output_dir) / RESULT
        weights = Path(config.output_dir) / "adapter" / "adapter_model.safetensors"
        # a record without its weights (a cache restored without them) trains again
        result = json.loads(done.read_text()) if done.exists() and weights.exists() else finetune(config)
        runs.append((Path(config.output_dir), result))
    return min(runs, key=lambda run: run[1]["eval_loss"])


def training_cost(result: dict) -> dict:
    """A trained row's cost (``total_cost``) and what the table prints beside it."""
    return {**total_cost(result), "attention": result["config"]["attention"], "p": result["config"]["p"],
            "rope": result["config"].get("rope"), "eval_loss": result["eval_loss"]}


def row_model(table: TableConfig, row: dict):
    """(model, tokenizer, cost dict) for a row."""
    if row.get("train", True):
        folder, result = train_row(table, row)
        model, tokenizer = load_adapted(folder)
        cost = training_cost(result)
        if row.get("eval_rope"):
            apply_rope(model, row["eval_rope"])
            cost["eval_rope"] = row["eval_rope"]
        return model, tokenizer, cost
    if "eval_rope" in row:
        raise ValueError(f"Row {row['name']!r}: eval_rope sets RoPE scaling on a trained model for evaluation "
                         "only; a row without training sets `rope` instead.")
    base = {**table.base, **{k: v for k, v in row.items() if k not in ("name", "train")}}
    attention, p, rope = base.get("attention", SOFTMAX), base.get("p", DEFAULT_P), base.get("rope")
    model, tokenizer = load(base.get("model", DEFAULT_MODEL), rope=rope)
    calibrated = base.get("temperature_init") == "calibrate"
    set_attention(model, attention, p=p, ssmax_length=base.get("ssmax_length"),
                  softmax_layers=base.get("softmax_layers"), softmax_heads=base.get("softmax_heads"),
                  head_temperature=calibrated)
    cost = {"steps": 0, "tokens": 0, "seconds": 0.0, "attention": attention, "p": p, "rope": rope}
    if calibrated:  # no training, only the temperatures fitted to the softmax layers (on training text)
        config = FinetuneConfig(**{**base, "head_temperature": True, "output_dir": str(Path(table.output_dir) / "runs")})
        fit = calibrate(model, config, build_datasets(config, tokenizer)[0])
        cost["seconds"], cost["tau"] = fit["seconds"], fit["tau"]
        print(f"{row['name']}: per-head tau fitted in {fit['seconds']:.0f} s, layer means "
              f"{[round(sum(t) / len(t), 2) for t in fit['tau']]}; summed layer-output MSE "
              f"{sum(fit['mse_at_1']):.4g} at tau = 1 -> {sum(fit['mse']):.4g}", flush=True)
    return model, tokenizer, cost


@torch.no_grad()
def passkey_score(model, tokenizer, length: int, docs: int) -> float:
    """Exact match of greedy passkey retrieval on the package's own passkey documents (the
    ``passkey_*`` lm-eval tasks' builder and scorer), ``docs`` documents of ``length`` tokens."""
    from ..lm_eval_tasks.utils import passkey, process_generated_key

    hits = []
    for doc in passkey(length, num_samples=docs, tokenizer=tokenizer)["test"]:
        ids = tokenizer(doc["input"], return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        hits.append(process_generated_key(doc, [text])["exact_match"])
    return sum(hits) / len(hits)


def evaluate_row(table: TableConfig, row: dict) -> dict:
    """{"cost": ..., "loss": {text label: {length: mean loss}}, "passkey": {length: exact match}},
    cached in <output_dir>/<row>/eval.json."""
    path = Path(table.output_dir) / slug(row["name"]) / "eval.json"
    cached = json.loads(path.read_text()) if path.exists() else {"loss": {}}
    cached.setdefault("passkey", {})
    todo = [(label, n) for label in table.eval_text for n in table.lengths
            if str(n) not in cached["loss"].get(label, {})]
    todo += [("passkey", n) for n in table.passkey_lengths if str(n) not in cached["passkey"]]
    if not todo and "cost" in cached:
        if row.get("train", True):  # reading finetune.json is cheap: keep the cost current
            cached["cost"] = training_cost(train_row(table, row)[1])
        return cached
    model, tokenizer, cost = row_model(table, row)
    cached["cost"] = cost
    for label, source in table.eval_text.items():
        ids = tokenize(tokenizer, read_text(source))
        ids = ids[int(len(ids) * table.eval_skip):]
        for n in table.lengths:
            if str(n) in cached["loss"].get(label, {}):
                continue
            windows = blocks(ids, n, max(1, table.eval_tokens // n))
            start = time.time()
            loss = mean_loss(model, windows, f"{row['name']} {label} @ {n}")
            cached["loss"].setdefault(label, {})[str(n)] = round(loss, 4)
            print(f"{row['name']:<28} {label:<16} L={n:<6} loss {loss:.4f} ppl {math.exp(loss):9.2f} "
                  f"({len(windows)} windows, {time.time() - start:.0f} s)", flush=True)
            save_cells(path, cached)
    for n in table.passkey_lengths:
        if str(n) in cached["passkey"]:
            continue
        start = time.time()
        cached["passkey"][str(n)] = passkey_score(model, tokenizer, n, table.passkey_docs)
        print(f"{row['name']:<28} passkey          L={n:<6} exact match {cached['passkey'][str(n)]:.2f} "
              f"({table.passkey_docs} documents, {time.time() - start:.0f} s)", flush=True)
        save_cells(path, cached)
    return cached


def save_cells(path: Path, cached: dict) -> None:
    """After every cell: an interrupted table resumes from here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))


def train_time(cost: dict) -> str:
    if not cost["steps"]:
        return "-"  # not trained
    at_least = "" if cost.get("seconds_complete", True) else "≥ "  # resumed, earlier time not recorded
    return f"{at_least}{cost['seconds'] / 60:.1f} min"


def markdown(table: TableConfig, results: dict) -> str:
    labels = list(table.eval_text)
    head = (["row", "p", "steps", "tokens", "train time"] + [f"{label} @{n}" for label in labels for n in table.lengths]
            + [f"passkey @{n}" for n in table.passkey_lengths])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        cost = res["cost"]
        p = f"{cost['p']:g}" if cost.get("attention") == "lssar" else ""
        cells = [name, p, str(cost["steps"]),
                 f"{cost['tokens']:,}", train_time(cost)]
        for label in labels:
            for n in table.lengths:
                loss = res["loss"].get(label, {}).get(str(n))
                cells.append("-" if loss is None else f"{math.exp(loss):.2f}")
        for n in table.passkey_lengths:
            score = res.get("passkey", {}).get(str(n))
            cells.append("-" if score is None else f"{score:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cached_row(table: TableConfig, row: dict) -> dict | None:
    """The cells measured so far for ``row`` (None before any), without training or measuring."""
    path = Path(table.output_dir) / slug(row["name"]) / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def named_rows(table: TableConfig, only: list | None) -> list[dict]:
    """The rows named in ``only`` in that order (the rows that matter most first), else every row."""
    by_name = {row["name"]: row for row in table.rows}
    unknown = [row for row in only or [] if row not in by_name]
    if unknown:
        raise ValueError(f"No rows named {unknown} in the table; its rows are {list(by_name)}.")
    return [by_name[row] for row in only or by_name]


def cached_results(table: TableConfig, only: list | None = None) -> dict:
    """{row name: cells} of the rows with cells cached so far; trains and measures nothing."""
    results = {row["name"]: cached_row(table, row) for row in named_rows(table, only)}
    return {row: res for row, res in results.items() if res is not None and "cost" in res}


def run_table(table: TableConfig, only: list | None = None, name: str = "table", measure: bool = True) -> str:
    """Train and evaluate every row (or the rows named in ``only``, in that order); writes <name>.md
    and <name>.json. ``measure=False``: only the cached cells ("-" for the rest), nothing written."""
    if not measure:
        return markdown(table, cached_results(table, only))
    results = {row["name"]: evaluate_row(table, row) for row in named_rows(table, only)}
    text = markdown(table, results)
    out = Path(table.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    return text
