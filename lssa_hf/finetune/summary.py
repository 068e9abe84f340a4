"""The headline view of an adaptation table: a few columns with the best of each in bold, and the gap
between the best LSSA/LSSAR row and the best softmax row per column (issue #14: users decide from it).

Reads only cached cells (``run_table(..., measure=False)`` results); computes nothing new.
"""

from __future__ import annotations

import math

from ..settings import SOFTMAX, VARIANTS


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def columns(results: dict, lengths: list) -> list[tuple[str, int]]:
    """(text label or "passkey", length) for every measured text and passkey length in ``lengths``."""
    texts = list(dict.fromkeys(label for res in results.values() for label in res["loss"]))
    passkey = sorted({int(n) for res in results.values() for n in res.get("passkey", {})})
    return [(label, n) for label in texts for n in lengths] + [("passkey", n) for n in passkey if n in lengths]


def value(res: dict, column: tuple[str, int]) -> float | None:
    """Perplexity of a text column, exact match of a passkey column; None if not measured."""
    label, n = column
    if label == "passkey":
        return res.get("passkey", {}).get(str(n))
    loss = res["loss"].get(label, {}).get(str(n))
    return None if loss is None else math.exp(loss)


def best(results: dict, column: tuple[str, int]) -> tuple[str, float] | None:
    """(row, value) of the best measured row in a column: lowest perplexity, highest passkey."""
    measured = [(row, v) for row, res in results.items() if (v := value(res, column)) is not None]
    if not measured:
        return None
    pick = max if column[0] == "passkey" else min
    return pick(measured, key=lambda item: item[1])


def training(tokens: int) -> str:
    if not tokens:
        return "none"
    return f"{tokens / 1e6:.2f}M tokens" if tokens >= 1e6 else f"{round(tokens / 1e3)}K tokens"


def headline(results: dict, lengths: list) -> str:
    """Markdown: row, training, then every text at ``lengths`` and passkey; bold = best in its column."""
    cols = columns(results, lengths)
    head, previous = ["row", "training"], None
    for label, n in cols:
        head.append(f"{label} @{length_label(n)}" if label != previous else f"@{length_label(n)}")
        previous = label
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(cols)]
    tops = [best(results, col) for col in cols]
    for row, res in results.items():
        cells = [row, training(res["cost"]["tokens"])]
        for col, top in zip(cols, tops):
            v = value(res, col)
            text = "-" if v is None else f"{v:.2f}"
            cells.append(f"**{text}**" if v is not None and v == top[1] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap(ours: tuple[str, float], theirs: tuple[str, float], column: tuple[str, int]) -> str:
    """Ratio of perplexities, or difference of passkey scores, of two (row, value) bests."""
    if column[0] == "passkey":
        return f"{ours[1] - theirs[1]:+.2f}"
    return f"{ours[1] / theirs[1]:.2f}×"


def sides(results: dict) -> tuple[dict, dict]:
    """(LSSA/LSSAR rows, softmax rows). ssmax is neither: it is our own baseline, not what users run."""
    ours = {row: res for row, res in results.items() if res["cost"].get("attention") in VARIANTS}
    theirs = {row: res for row, res in results.items() if res["cost"].get("attention") == SOFTMAX}
    return ours, theirs


def gaps(results: dict, lengths: list) -> str:
    """Markdown: per column, the best LSSA/LSSAR row against the best softmax row (ratio of perplexities,
    difference of passkey scores)."""
    ours, theirs = sides(results)
    lines = ["| column | best LSSA/LSSAR row | | best softmax row | | LSSAR vs softmax |",
             "|---|---|---:|---|---:|---:|"]
    for col in columns(results, lengths):
        a, b = best(ours, col), best(theirs, col)
        if a is None or b is None:
            continue
        name = f"{col[0]} @{length_label(col[1])}"
        lines.append(f"| {name} | {a[0]} | {a[1]:.2f} | {b[0]} | {b[1]:.2f} | {gap(a, b, col)} |")
    return "\n".join(lines)


def gaps_by_budget(results: dict, lengths: list) -> str:
    """Markdown: the same gap at each training budget, so a row trained on more text never meets a
    baseline trained on less: LSSA/LSSAR rows trained on T tokens against softmax rows trained on the
    same T tokens or on none (YaRN needs no training). "-" where one side has no measured cell."""
    ours, theirs = sides(results)
    budgets = sorted({res["cost"]["tokens"] for res in ours.values()})
    lines = ["| column | " + " | ".join(training(t) if t else "no training" for t in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for col in columns(results, lengths):
        cells = []
        for t in budgets:
            a = best({r: res for r, res in ours.items() if res["cost"]["tokens"] == t}, col)
            b = best({r: res for r, res in theirs.items() if res["cost"]["tokens"] in (0, t)}, col)
            cells.append("-" if a is None or b is None else gap(a, b, col))
        lines.append(f"| {col[0]} @{length_label(col[1])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
