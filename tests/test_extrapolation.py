"""Pretraining recipe and length-extrapolation evaluation, on a tiny preset (CPU, seconds)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import lssa_hf
from lssa_hf.cli import main
from lssa_hf.data import builtin_text
from lssa_hf.models import load
from lssa_hf import evaluation
from lssa_hf.extrapolation import ModelSpec, extrapolate, format_table, plot, position_losses
from lssa_hf.pretrain import PretrainConfig, batches, pretrain

T = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("extrapolation")
    held_out = root / "held_out.txt"
    held_out.write_text(builtin_text()[300_000:360_000])
    config = PretrainConfig(
        output_dir=str(root / "runs"), max_train_chars=120_000, eval_text=str(held_out), tokenizer="bpe:512",
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2),
        train_length=T, batch_size=8, max_steps=8, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2)
    paths = pretrain(config)
    return root, held_out, paths


def log_of(path):
    return json.loads((path / "pretrain.json").read_text())["log"]


@pytest.mark.parametrize("attention", ["softmax", "lssa", "lssar"])
def test_tiny_preset_trains_every_variant(trained, attention):
    log = log_of(trained[2][attention])
    losses = log["train_loss"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0]
    assert math.isfinite(log["eval"][-1]["loss"])


def test_variants_share_data_and_initialisation(trained):
    """Same first-step loss: same init weights and batch; attention alone differs (uniform at init)."""
    first = {a: log_of(p)["train_loss"][0] for a, p in trained[2].items()}
    assert max(first.values()) - min(first.values()) < 0.05, first
    ids = torch.arange(1000)
    assert torch.equal(next(batches(ids, T, 4, seed=0)), next(batches(ids, T, 4, seed=0)))


def test_checkpoints_reload_with_their_attention(trained):
    paths = trained[2]
    lssar = AutoModelForCausalLM.from_pretrained(paths["lssar"])
    assert lssa_hf.settings_of(lssar) == lssa_hf.LSSAConfig(variant="lssar", p=15.0)
    assert not lssa_hf.is_patched(AutoModelForCausalLM.from_pretrained(paths["softmax"]))
    assert lssar.config.max_position_embeddings >= 16 * T


def test_extrapolation_table_and_plot(trained, tmp_path):
    root, held_out, paths = trained
    specs = [ModelSpec(str(paths[a]), label=a) for a in ("softmax", "lssa", "lssar")]
    specs.append(ModelSpec.parse(f"{paths['lssa']}@lssar:3"))
    results = extrapolate(specs, held_out.read_text(), T, factors=(1, 2, 4), n_tokens=1024)
    assert results["lengths"] == [32, 64, 128]
    assert set(results["n_tokens"].values()) == {1024}
    for row in results["models"].values():
        assert all(math.isfinite(v) for v in row["all"] + row["last"])
        assert row["all"][0] == pytest.approx(row["last"][0])  # at L = T both metrics are the same mean
    assert results["models"]["lssa as lssar p=3"]["attention"] == "lssar p=3"
    assert results["models"]["lssa"]["context"]["bins"] == ["1", "2-4", "5-16", "17-31"]
    table = format_table(results)
    assert "| 128 (4T) |" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(specs)
    png = plot(results, tmp_path / "plot.png")
    assert png.stat().st_size > 1000


def test_position_losses_in_slices_equal_one_cross_entropy(trained, monkeypatch):
    """Per-position loss computed in slices of positions (memory) equals the plain computation."""
    root, held_out, paths = trained
    model, tokenizer = load(str(paths["lssar"]))
    ids = lssa_hf.data.tokenize(tokenizer, held_out.read_text())[: 3 * 4 * T]
    monkeypatch.setattr(evaluation, "LOSS_SLICE", 7)  # slices that do not divide 4T - 1
    got = position_losses(model, ids, 4 * T, batch_tokens=2 * 4 * T)
    windows = ids.view(3, 4 * T)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)


def test_cli_handles_any_causal_lm(trained, tmp_path, capsys):
    """Any causal LM: a GPT-2 with 2T learned positions, as is and as LSSAR, gets n/a beyond them."""
    root, held_out, paths = trained
    tokenizer = load(str(paths["softmax"]))[1]
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                                       n_positions=2 * T))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code = main(["extrapolate", str(paths["lssar"]), f"{tmp_path / 'gpt2'}@lssar:15=gpt2 lssar",
                 str(tmp_path / "gpt2"), "--text", str(held_out), "--factors", "1", "2", "4", "--tokens", "512",
                 "--plot", str(tmp_path / "cli.png"), "--json", str(tmp_path / "cli.json")])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "cli.png").exists()
    assert "| 128 (4T) |" in out and "n/a" in out  # T read from pretrain.json
    assert "| context 1 | context 2-4 |" in out
    results = json.loads((tmp_path / "cli.json").read_text())
    for label in ("gpt2", "gpt2 lssar"):
        assert math.isfinite(results["models"][label]["all"][1]) and math.isnan(results["models"][label]["all"][2])


def test_model_spec_parsing():
    assert ModelSpec.parse("runs/lssa@lssar:3") == ModelSpec("runs/lssa", "lssar", 3.0)
    assert ModelSpec.parse("runs/lssa", variant="lssar", p=1) == ModelSpec("runs/lssa", "lssar", 1)
    assert ModelSpec.parse("gpt2@softmax=base").name() == "base"
    assert ModelSpec.parse("runs/lssa@lssar:15").name() == "lssa as lssar p=15"
    with pytest.raises(ValueError, match="Unknown attention"):
        ModelSpec.parse("x@flash")
