"""The command line: info, and the compare job on a tiny model."""

import math

import torch

import lssa_hf
from lssa_hf.cli import main
from lssa_hf.commands.compare import compare, format_table
from lssa_hf.data import blocks, normalise, read_text
from tiny_models import tiny_model


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def test_info_lists_backends(capsys):
    assert main(["info", "--no-models"]) == 0
    out = capsys.readouterr().out
    assert "lssa, lssar" in out and "transformers" in out


def test_compare_measures_each_variant_and_restores_softmax():
    model = tiny_model("llama")
    x = torch.randint(3, 90, (1, 16))
    with torch.no_grad():
        before = model(x).logits
    variants = ["lssa", "softmax", "lssar"]
    results = compare(model, CharTokenizer(), "some text " * 20, [8, 16], variants, p=15.0, windows=2)
    assert set(results) == {(v, n) for v in variants for n in (8, 16)}
    assert all(math.isfinite(loss) for loss in results.values())
    assert results["lssa", 16] != results["softmax", 16]
    assert lssa_hf.is_patched(model)  # the last variant stays in force
    lssa_hf.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    table = format_table(results, [8, 16], variants)
    assert table.count("\n") == 4 and "loss@16" in table


def test_text_sources(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("\ufeffheader\r\n*** START OF THE BOOK ***\r\nCall me Ishmael.\r\n*** END OF THE BOOK ***\r\nlicence")
    assert normalise(book.read_text(encoding="utf-8")) == "Call me Ishmael.\n"
    assert read_text(str(tmp_path)) == "Call me Ishmael.\n"
    assert len(read_text(None)) > 100_000  # offline default
    assert blocks(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
