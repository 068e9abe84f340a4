"""The headline view of an adaptation table (lssa_hf.finetune.summary) on cells written by hand: which
cell is bold, which rows a gap compares, and the CLI that prints both from the cache."""

import json
import math
import subprocess
import sys
from pathlib import Path

from lssa_hf.finetune.summary import gaps, gaps_by_budget, headline
from lssa_hf.finetune.table import TableConfig, cached_results, slug

ROOT = Path(__file__).resolve().parents[1]


def cells(attention, tokens, ppl, passkey=None):
    """A cached row: perplexities {text: {length: ppl}} stored as losses, like evaluate_row writes."""
    loss = {text: {str(n): math.log(v) for n, v in by_n.items()} for text, by_n in ppl.items()}
    return {"loss": loss, "passkey": {str(n): v for n, v in (passkey or {}).items()},
            "cost": {"steps": tokens // 1024, "tokens": tokens, "seconds": 1.0, "attention": attention}}


RESULTS = {
    "softmax + YaRN": cells("softmax", 0, {"wt": {512: 30.0, 8192: 20.0}}, {8192: 1.0}),
    "softmax + LoRA": cells("softmax", 245760, {"wt": {512: 22.0, 8192: 40.0}}, {8192: 0.0}),
    "ssmax + LoRA": cells("ssmax", 245760, {"wt": {512: 10.0, 8192: 10.0}}, {8192: 0.5}),
    "LSSAR": cells("lssar", 1024000, {"wt": {512: 33.0}}, {8192: 0.5}),
    "LSSA": cells("lssa", 245760, {"wt": {512: 44.0, 8192: 30.0}}),
}


def test_headline_bolds_the_best_of_each_column_and_marks_missing_cells():
    lines = headline(RESULTS, [512, 8192]).splitlines()
    assert lines[0] == "| row | training | wt @512 | @8K | passkey @8K |"
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert rows["ssmax + LoRA"] == ["246K tokens", "**10.00**", "**10.00**", "0.50"]  # lowest perplexity
    assert rows["softmax + YaRN"] == ["none", "30.00", "20.00", "**1.00**"]  # highest passkey
    assert rows["LSSAR"] == ["1.02M tokens", "33.00", "-", "0.50"]
    assert rows["LSSA"][-1] == "-"


def test_gaps_compare_the_best_lssa_row_with_the_best_softmax_row_not_ssmax():
    lines = gaps(RESULTS, [512, 8192]).splitlines()[2:]
    by_column = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines}
    assert by_column["wt @512"] == ["LSSAR", "33.00", "softmax + LoRA", "22.00", "1.50×"]
    assert by_column["wt @8K"] == ["LSSA", "30.00", "softmax + YaRN", "20.00", "1.50×"]
    assert by_column["passkey @8K"] == ["LSSAR", "0.50", "softmax + YaRN", "1.00", "-0.50"]


def test_gaps_by_budget_never_match_a_row_with_a_baseline_trained_on_other_text():
    """LSSA rows trained on T tokens meet softmax rows trained on T tokens or on none, nothing else."""
    lines = gaps_by_budget(RESULTS, [512, 8192]).splitlines()
    assert lines[0] == "| column | 246K tokens | 1.02M tokens |"
    by_column = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert by_column["wt @512"] == ["2.00×", "1.10×"]  # 1.02M: LSSAR 33 vs YaRN 30, not the 246K LoRA's 22
    assert by_column["wt @8K"] == ["1.50×", "-"]  # 246K: LSSA 30 vs YaRN 20 (no training beats the LoRA's 40)
    assert by_column["passkey @8K"] == ["-", "-0.50"]  # the 246K LSSA row has no passkey cell


def test_summary_cli_reads_the_cache_in_the_order_asked(tmp_path):
    rows = [{"name": name, "attention": res["cost"]["attention"]} for name, res in RESULTS.items()]
    rows.append({"name": "never measured", "attention": "lssar"})
    config = tmp_path / "table.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "rows": rows}))  # JSON is YAML
    for name, res in RESULTS.items():
        (tmp_path / "out" / slug(name)).mkdir(parents=True)
        (tmp_path / "out" / slug(name) / "eval.json").write_text(json.dumps(res))
    table = TableConfig.from_yaml(config)
    assert list(cached_results(table, ["LSSA", "softmax + LoRA"])) == ["LSSA", "softmax + LoRA"]
    assert "never measured" not in cached_results(table)
    out = subprocess.run([sys.executable, str(ROOT / "recipes/adapt/run_table.py"), "--config", str(config),
                          "--summary", "512", "8192"], capture_output=True, text=True, check=True).stdout
    views = [view(cached_results(table), [512, 8192]) for view in (headline, gaps, gaps_by_budget)]
    assert out == "\n\n".join(views) + "\n"


def table_after(path: Path, anchor: str) -> str:
    """The markdown table that follows ``anchor`` in a document (blank lines before it allowed)."""
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if anchor in line) + 1
    while not lines[start].strip():
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def test_readme_and_docs_tables_are_the_commands_output_on_the_committed_cells():
    """The README's headline and gap tables and docs/baselines.md's full table are exactly what the
    commands they name print from recipes/adapt/results (regenerate them when cells are added)."""
    from lssa_hf.finetune.table import markdown

    table = TableConfig.from_yaml(ROOT / "recipes/adapt/configs/table-baselines-cpu.yaml")
    results, lengths = cached_results(table), [512, 8192, 16384, 32768]
    assert table_after(ROOT / "README.md", "<!-- headline table -->") == headline(results, lengths)
    assert table_after(ROOT / "README.md", "<!-- gaps table -->") == gaps(results, lengths)
    assert table_after(ROOT / "README.md", "<!-- gaps by budget -->") == gaps_by_budget(results, lengths)
    assert table_after(ROOT / "docs/baselines.md", "<!-- gaps table -->") == gaps(results, lengths)
    assert table_after(ROOT / "docs/baselines.md", "<!-- gaps by budget -->") == gaps_by_budget(results, lengths)
    assert table_after(ROOT / "docs/baselines.md", "<!-- cached table -->") == markdown(table, results)
