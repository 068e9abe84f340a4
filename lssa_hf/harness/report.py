"""Score vs context length from lm_eval result files: a markdown table and a PNG plot, one line per
model/attention (softmax vs lssa vs lssar)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from ..settings import DEFAULT_P, SOFTMAX

DEFAULT_METRICS = ("exact_match", "acc", "key_logprob", "token_perplexity")
LENGTH_SUFFIX = re.compile(r"^(?P<family>.+)_(?P<n>\d+)(?P<k>k?)$")


def task_length(name: str, config: dict) -> tuple[str, int] | None:
    """(family, context length) of a task: ``dataset_kwargs.seq_length``, else a ``_<n>`` / ``_<n>k`` suffix."""
    match = LENGTH_SUFFIX.match(name)
    length = (config.get("dataset_kwargs") or {}).get("seq_length")
    if match is None:
        return None
    if length is None:
        length = int(match["n"]) * (1024 if match["k"] else 1)
    return match["family"], int(length)


def run_label(config: dict) -> str:
    """"<model> <attention>" of one run; stock ``hf`` runs are softmax."""
    attention = config.get("attention", SOFTMAX)
    if attention == "lssar" and config.get("lssa_p") not in (None, DEFAULT_P):
        attention += f" p={config['lssa_p']:g}"
    args = config.get("model_args") or {}
    if isinstance(args, str):  # simple_evaluate keeps the "k=v,k=v" string
        args = dict(item.split("=", 1) for item in args.split(",") if "=" in item)
    name = str(args.get("pretrained") or config.get("model") or "")
    return f"{Path(name).name or name} {attention}".strip()


def collect(output_dir, metrics=DEFAULT_METRICS) -> dict:
    """{(family, metric): {label: {length: value}}}; later result files win over earlier ones."""
    found = defaultdict(lambda: defaultdict(dict))
    for path in sorted(Path(output_dir).rglob("results_*.json"), key=lambda p: p.name):
        data = json.loads(path.read_text())
        label = run_label(data.get("config", {}))
        for task, scores in data.get("results", {}).items():
            where = task_length(task, data.get("configs", {}).get(task, {}))
            if where is None:
                continue
            for key, value in scores.items():
                metric, _, _filter = key.partition(",")
                if metric in metrics and isinstance(value, (int, float)):
                    found[where[0], metric][label][where[1]] = float(value)
    return found


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _order(item) -> tuple:
    """Baselines (softmax) before LSSA variants, then by name."""
    return (SOFTMAX not in item[0], item[0])


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(found: dict) -> str:
    parts = []
    for (family, metric), lines in sorted(found.items()):
        lengths = sorted({n for values in lines.values() for n in values})
        head = f"| {family}: {metric} | " + " | ".join(map(_length, lengths)) + " |"
        rows = [f"| {label} | " + " | ".join(_cell(values.get(n)) for n in lengths) + " |"
                for label, values in sorted(lines.items(), key=_order)]
        parts.append("\n".join([head, "|---" * (len(lengths) + 1) + "|", *rows]))
    return "\n\n".join(parts) + "\n"


def plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = sorted(found)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (family, metric) in zip(axes[0], panels):
        every = sorted({n for values in found[family, metric].values() for n in values})
        for label, values in sorted(found[family, metric].items(), key=_order):
            lengths = sorted(values)
            ax.plot(lengths, [values[n] for n in lengths], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(every, [_length(n) for n in every])
        if metric.endswith("perplexity"):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        elif metric in ("exact_match", "acc"):
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{family}: {metric}")
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output_dir, metrics=None, name: str = "lssa_report") -> list[Path]:
    """Write ``<name>.md`` and ``<name>.png`` into ``output_dir``; returns the paths (none if no
    length-indexed task results were found)."""
    output_dir = Path(output_dir)
    found = collect(output_dir, tuple(metrics or DEFAULT_METRICS))
    if not found:
        return []
    table, image = output_dir / f"{name}.md", output_dir / f"{name}.png"
    table.write_text(markdown(found))
    plot(found, image)
    return [table, image]
