"""LoRA adaptation recipe on tiny random models with a tiny BPE tokenizer and real text (CPU)."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch


import lssa_hf  # noqa: E402
from lssa_hf.data import builtin_text  # noqa: E402
from lssa_hf.finetune import FinetuneConfig, adapt, finetune, load_adapted  # noqa: E402
from lssa_hf.finetune.data import build_datasets  # noqa: E402
from lssa_hf.finetune.lora import add_lora, attention_modules, attention_targets  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXT = SHARED / "books" / "pg11_alice_in_wonderland.txt"
if not TEXT.exists():  # a machine without ../shared: Python's own documentation, shipped with CPython
    TEXT = Path(tempfile.mkdtemp()) / "builtin.txt"
    TEXT.write_text(builtin_text()[:200_000])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama and a byte-level BPE tokenizer trained on 30 KB of Alice in Wonderland."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT.read_text()[:30_000]], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def config(checkpoint, out, **overrides):
    values = dict(model=checkpoint, output_dir=str(out), train_text=[str(TEXT)], max_train_tokens=12_000,
                  block_size=32, batch_size=4, max_steps=6, lr=2e-2,
                  # a random model: lm_head too, so that it can learn the unigram distribution
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"], warmup_steps=0, logging_steps=1,
                  eval_steps=0, save_steps=0, lora_r=4, lora_alpha=8, max_eval_blocks=8, progress=False)
    values.update(overrides)
    return FinetuneConfig(**values)


def eval_loss(model, dataset) -> float:
    with torch.no_grad():
        x = dataset[:]["input_ids"]
        return model.eval()(x, labels=x).loss.item()


def logits(model, dataset):
    with torch.no_grad():
        return model.eval()(dataset[:2]["input_ids"]).logits


def test_lora_lowers_the_loss_and_saved_artefacts_reload_as_lssa(checkpoint, tmp_path):
    cfg = config(checkpoint, tmp_path, merge=True, attention="lssar", p=15.0)
    untrained = lssa_hf.from_pretrained(checkpoint, variant="lssar", p=15.0)
    model, tokenizer, result = adapt(cfg)
    _, valid = build_datasets(cfg, tokenizer)
    assert result["eval_loss"] < eval_loss(untrained, valid) - 0.05
    assert result["steps"] == 6 and result["tokens"] == 6 * 4 * 32 and result["processes"] == 1
    assert json.loads((tmp_path / "finetune.json").read_text())["eval_loss"] == result["eval_loss"]
    want = logits(model, valid)

    reloaded, _ = load_adapted(tmp_path, merge=False)  # base + adapter file
    assert lssa_hf.settings_of(reloaded) == lssa_hf.LSSAConfig(variant="lssar", p=15.0)
    torch.testing.assert_close(logits(reloaded, valid), want, rtol=1e-5, atol=1e-5)

    from transformers import AutoModelForCausalLM

    for merged in (AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), lssa_hf.from_pretrained(tmp_path / "merged")):
        assert lssa_hf.is_patched(merged) and lssa_hf.settings_of(merged).p == 15.0
        torch.testing.assert_close(logits(merged, valid), want, rtol=1e-4, atol=1e-4)


def test_warm_start_lowers_the_per_layer_attention_mse(checkpoint, tmp_path):
    cfg = config(checkpoint, tmp_path, attention="lssa", warm_start=True, warm_start_steps=8, warm_start_lr=2e-2,
                 max_steps=2)
    result = finetune(cfg)["warm_start"]
    before, after = result["layer_mse_before"], result["layer_mse_after"]
    assert len(before) == 2 and result["steps"] == 8 and result["targets"] == ["q_proj", "k_proj"]
    assert sum(after) < 0.9 * sum(before)
    from safetensors.torch import load_file

    warm = load_file(tmp_path / "warm_start" / "adapter" / "adapter_model.safetensors")
    trained = {k for k, v in warm.items() if "lora_B" in k and v.abs().sum() > 0}
    assert trained and all(".q_proj." in k or ".k_proj." in k for k in trained)  # only q/k moved
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".v_proj." in k and v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # then all


def test_warm_start_on_a_hybrid_with_yarn_trains_only_the_lssa_layers(checkpoint, tmp_path):
    """The table's warm-start row: YaRN teacher, softmax kept in layer 0. That layer is its own teacher
    (MSE 0, its q/k LoRA stays zero); layer 1 learns; the rope and the hybrid survive the reload."""
    cfg = config(checkpoint, tmp_path, attention="lssar", p=5.0, rope="yarn:2", softmax_layers=[0],
                 head_temperature=True, warm_start=True, warm_start_steps=8, warm_start_lr=2e-2, max_steps=2)
    result = finetune(cfg)["warm_start"]
    before, after = result["layer_mse_before"], result["layer_mse_after"]
    assert before[0] == 0.0 and after[0] == 0.0 and 0 < after[1] < before[1]
    from safetensors.torch import load_file

    warm = load_file(tmp_path / "warm_start" / "adapter" / "adapter_model.safetensors")
    moved = {k for k, v in warm.items() if "lora_B" in k and v.abs().sum() > 0}
    assert moved and all(".layers.1." in k for k in moved)
    model, _ = load_adapted(tmp_path, merge=False)
    settings = lssa_hf.settings_of(lssa_hf.patching.base_model(model))
    assert tuple(settings.softmax_layers) == (0,) and settings.p == 5.0
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 2.0


def test_warm_start_with_every_head_of_a_layer_on_softmax_leaves_that_layer_alone(checkpoint, tmp_path):
    """softmax_heads through the warm start, training and reload: all 4 heads of layer 0 on softmax
    make it its own teacher (MSE 0) as softmax_layers=[0] does, one head of layer 1 changes nothing there."""
    cfg = config(checkpoint, tmp_path, attention="lssar", p=5.0, softmax_heads={0: [0, 1, 2, 3], 1: [2]},
                 warm_start=True, warm_start_steps=4, warm_start_lr=2e-2, max_steps=2)
    result = finetune(cfg)["warm_start"]
    before, after = result["layer_mse_before"], result["layer_mse_after"]
    assert before[0] == 0.0 and after[0] == 0.0 and 0 < after[1] < before[1]
    model, _ = load_adapted(tmp_path, merge=False)
    settings = lssa_hf.settings_of(lssa_hf.patching.base_model(model))
    assert settings.softmax_heads == ((0, (0, 1, 2, 3)), (1, (2,))) and settings.softmax_layers == ()


def test_learned_temperatures_train_save_and_reload_everywhere(checkpoint, tmp_path):
    """head_temperature: the warm start and LoRA move tau at its own learning rate, and the adapter,
    the merged checkpoint and the lm-eval model type all reload the learned values."""
    from lssa_hf.temperature import temperatures

    cfg = config(checkpoint, tmp_path, attention="lssar", head_temperature=True, temperature_lr=0.2, merge=True,
                 warm_start=True, warm_start_steps=4, warm_start_lr=2e-2, max_steps=4)
    model, tokenizer, result = adapt(cfg)
    _, valid = build_datasets(cfg, tokenizer)
    tau = temperatures(lssa_hf.patching.base_model(model))
    assert tau.shape == (2, 4) and (tau - 1).abs().min() > 0.01  # every head moved...
    # ...further than 8 Adam steps (each <= lr in size) at the LoRA rates (2e-2) could take log(tau)
    assert tau.log().abs().max() > 0.3
    want = logits(model, valid)
    reloaded, _ = load_adapted(tmp_path, merge=False)
    torch.testing.assert_close(temperatures(lssa_hf.patching.base_model(reloaded)), tau)
    torch.testing.assert_close(logits(reloaded, valid), want, rtol=1e-5, atol=1e-5)
    merged = lssa_hf.from_pretrained(tmp_path / "merged")
    assert lssa_hf.settings_of(merged).head_temperature
    torch.testing.assert_close(logits(merged, valid), want, rtol=1e-4, atol=1e-4)
    from lssa_hf.harness.model import LSSAHFLM

    lm = LSSAHFLM(pretrained=str(tmp_path / "merged"), device="cpu")
    torch.testing.assert_close(temperatures(lm.model), tau)


def test_the_recipe_default_hybrid_with_yarn_warm_starts_trains_and_merges(checkpoint, tmp_path):
    """The recipe's default (LSSAR + YaRN x2, softmax kept in some layers, learned temperatures) through
    the warm start, training and merge: the adapter and the merged checkpoint reload all of it."""
    cfg = config(checkpoint, tmp_path, attention="lssar", p=5.0, rope="yarn:2", softmax_layers=[0],
                 head_temperature=True, merge=True, warm_start=True, warm_start_steps=2, max_steps=2)
    model, tokenizer, result = adapt(cfg)
    assert all(math.isfinite(mse) for mse in result["warm_start"]["layer_mse_after"])
    _, valid = build_datasets(cfg, tokenizer)
    want = logits(model, valid)
    for reloaded in (load_adapted(tmp_path, merge=False)[0], lssa_hf.from_pretrained(tmp_path / "merged")):
        base = lssa_hf.patching.base_model(reloaded)
        assert lssa_hf.settings_of(base).softmax_layers == (0,) and lssa_hf.settings_of(base).head_temperature
        assert base.config.rope_parameters["rope_type"] == "yarn" and base.config.rope_parameters["factor"] == 2
        torch.testing.assert_close(logits(reloaded, valid), want, rtol=1e-4, atol=1e-4)


def test_extrapolate_evaluates_a_finetune_output_folder(checkpoint, tmp_path):
    """`lssa-hf extrapolate RUN_FOLDER`: the base model with the run's attention, temperatures and adapter."""
    from lssa_hf.data import tokenize
    from lssa_hf.extrapolation import ModelSpec, extrapolate

    cfg = config(checkpoint, tmp_path, attention="lssar", p=3.0, head_temperature=True, temperature_lr=0.2,
                 max_steps=2)
    model, tokenizer, _ = adapt(cfg)
    text = TEXT.read_text()[:20_000]
    results = extrapolate([ModelSpec(str(tmp_path), label="run")], text, 32, factors=(1, 4), n_tokens=512)
    row = results["models"]["run"]
    assert row["attention"] == "lssar p=3"
    windows = tokenize(tokenizer, text)[:512].view(4, 128)
    with torch.no_grad():
        want = model.eval()(windows, labels=windows).loss.item()
    assert row["all"][1] == pytest.approx(want, rel=1e-5)
    assert row["context_longest"]["bins"] == ["1", "2-4", "5-16", "17-64", "65-127"]


def test_p_schedule_sets_p_before_every_step_and_saves_the_final_p(checkpoint, tmp_path, monkeypatch):
    from lssa_hf.integrations import hf_attention

    seen = []  # (training?, p) of every attention call

    def recording(query, key, value, mask, **kwargs):
        seen.append((torch.is_grad_enabled(), kwargs["p"]))
        return real(query, key, value, mask, **kwargs)

    real = hf_attention.lssa_attention
    monkeypatch.setattr(hf_attention, "lssa_attention", recording)
    cfg = config(checkpoint, tmp_path, attention="lssar", p=3.0, p_schedule=[[0, 1], [4, 3]], head_temperature=True)
    result = finetune(cfg)
    layers = 2
    trained = [p for grad, p in seen if grad][::layers]
    assert trained == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]  # linear from step 0 to 4, then constant
    assert {p for grad, p in seen if not grad} == {3.0}  # the final evaluation: the saved p
    assert result["config"]["p_schedule"] == [[0, 1.0], [4, 3.0]]
    monkeypatch.undo()
    model, _ = load_adapted(tmp_path, merge=False)
    assert lssa_hf.settings_of(model).p == 3.0


def test_p_schedule_is_piecewise_linear_and_rejects_what_it_cannot_do():
    from lssa_hf.finetune.schedule import power_at

    points = [(10, 3.0), (20, 3.0), (30, 6.0)]
    assert [power_at(points, s) for s in (0, 10, 15, 20, 25, 30, 99)] == [3.0, 3.0, 3.0, 3.0, 4.5, 6.0, 6.0]
    ok = dict(attention="lssar", p=6, max_steps=40)
    assert FinetuneConfig(**ok, p_schedule=[[0, 3], [30, 6]]).first_p == 3.0
    assert FinetuneConfig(**ok).first_p == 6.0
    bad = {"ends at p=5": [[0, 3], [30, 5]], "increase strictly": [[10, 3], [10, 6]],
           "after max_steps": [[0, 3], [50, 6]], "> 0": [[0, 0], [30, 6]], "pairs": [3, 6], "empty": []}
    for message, schedule in bad.items():
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**ok, p_schedule=schedule)
    with pytest.raises(ValueError, match="attention 'lssar'"):
        FinetuneConfig(attention="lssa", p_schedule=[[0, 3], [30, 6]])


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(checkpoint, tmp_path):
    from safetensors.torch import load_file

    full = config(checkpoint, tmp_path / "full", max_steps=4, save_steps=2)
    finetune(full)
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", resumed / "checkpoint-2")  # "killed" at 2
    result = finetune(config(checkpoint, tmp_path / "resumed", max_steps=4, save_steps=2))
    assert result["resumed_from"].endswith("checkpoint-2") and result["steps"] == 4
    stored = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    before = stored["WallClock"]["attributes"]["seconds"]
    assert 0 < before < result["seconds"] and result["seconds_complete"]  # the killed run's time is counted
    want = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_two_process_accelerate_run_writes_the_same_artefacts(checkpoint, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo) through the CLI, warm start included."""
    out = tmp_path / "ddp"
    yaml_path = tmp_path / "tiny.yaml"
    cfg = config(checkpoint, out, max_steps=3, merge=True, attention="lssar", warm_start=True, warm_start_steps=2)
    import yaml
    yaml_path.write_text(yaml.safe_dump(cfg.to_dict()))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml"),
                          "-m", "lssa_hf.cli", "finetune", "--config", str(yaml_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "finetune.json").read_text())
    assert result["processes"] == 2 and result["tokens"] == 3 * 4 * 32 * 2
    assert result["warm_start"]["processes"] == 2 and len(result["warm_start"]["layer_mse_after"]) == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    model, tokenizer = load_adapted(out)
    assert lssa_hf.settings_of(model).variant == "lssar"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert lssa_hf.is_patched(merged)
    x = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,targets,qk", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj"]),
    ("gpt2", ["attn.c_attn", "attn.c_proj"], ["attn.c_attn"]),
])
def test_default_targets_per_architecture(name, targets, qk):
    model = tiny_model(name)
    assert attention_targets(model) == (targets, qk)
    assert len(attention_modules(model)) == 2
    lora = add_lora(lssa_hf.patch(model, variant="lssa"), FinetuneConfig(lora_r=2, train_text=[]))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert wrapped and all(any(w.endswith(t) for t in targets) for w in wrapped)
    assert not any("mlp" in w for w in wrapped)  # GPT-2's MLP has a c_proj too
    assert any("modules_to_save" in n for n, p in lora.named_parameters() if p.requires_grad)  # norms
    assert lssa_hf.is_patched(lora)


def test_a_checkpoint_without_its_training_time_marks_the_cost_incomplete(checkpoint, tmp_path):
    from lssa_hf.finetune.table import train_time, training_cost

    finetune(config(checkpoint, tmp_path, max_steps=2, save_steps=1, save_total_limit=None))
    state_file = tmp_path / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["WallClock"]  # as written before the time was checkpointed
    state_file.write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-2")
    result = finetune(config(checkpoint, tmp_path, max_steps=2, save_steps=1, save_total_limit=None))
    assert result["resumed_from"].endswith("checkpoint-1") and not result["seconds_complete"]
    cost = training_cost(result)
    assert not cost["seconds_complete"] and train_time(cost).startswith("≥ ")
    old_format = {k: v for k, v in result.items() if k != "seconds_complete"}  # finetune.json of an older run
    assert not training_cost(old_format)["seconds_complete"]
    assert training_cost({**old_format, "resumed_from": None})["seconds_complete"]


def test_init_adapter_continues_a_finished_run_and_adds_its_cost(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from lssa_hf.finetune.table import training_cost

    first = finetune(config(checkpoint, tmp_path / "first", attention="lssar", p=3.0, head_temperature=True))
    weights = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    cont = config(checkpoint, tmp_path / "cont", attention="lssar", p=3.0, head_temperature=True, max_steps=2,
                  lr=0.0, temperature_lr=0.0, warmup_steps=0, init_adapter=str(tmp_path / "first"))
    result = finetune(cont)  # learning rates 0: nothing moves, so the saved adapter is the first run's
    got = load_file(tmp_path / "cont" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == weights.keys() and any("lssa_temperature" in k for k in got)
    for key in weights:
        torch.testing.assert_close(got[key], weights[key])
    assert result["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-4)
    cost = training_cost(result)
    assert cost["steps"] == 6 + 2 and cost["tokens"] == (6 + 2) * 4 * 32 and cost["seconds_complete"]
    with pytest.raises(ValueError, match="lora_r"):
        finetune(config(checkpoint, tmp_path / "bad", attention="lssar", p=3.0, head_temperature=True, lora_r=2,
                        init_adapter=str(tmp_path / "first")))
    with pytest.raises(ValueError, match="unexpected"):  # no temperatures here: the first run's do not fit
        finetune(config(checkpoint, tmp_path / "bad1", attention="lssar", p=3.0, init_adapter=str(tmp_path / "first")))
    with pytest.raises(FileNotFoundError, match="finished"):
        finetune(config(checkpoint, tmp_path / "bad2", init_adapter=str(tmp_path / "nothing")))


def test_config_rejects_unknown_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attention: lssar\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        FinetuneConfig.from_yaml(path)
    with pytest.raises(ValueError, match="softmax"):
        FinetuneConfig(attention="flash")
    with pytest.raises(ValueError, match="temperature_init"):
        FinetuneConfig(temperature_init="paper")
    with pytest.raises(ValueError, match="head_temperature: true"):
        FinetuneConfig(temperature_init="calibrate", head_temperature=False)
    assert FinetuneConfig.from_yaml(None, p=3, warm_start=None).p == 3.0


def test_results_table_trains_picks_the_best_p_and_caches(checkpoint, tmp_path):
    from lssa_hf.finetune.table import TableConfig, run_table

    base = config(checkpoint, tmp_path, max_steps=2).to_dict()
    for key in ("output_dir", "attention", "p"):
        base.pop(key)
    table = TableConfig(output_dir=str(tmp_path / "table"), base=base, lengths=[16, 32], eval_tokens=64,
                        eval_text={"alice": str(TEXT)},
                        rows=[{"name": "softmax", "attention": "softmax", "train": False},
                              {"name": "LSSAR p=2 + LoRA", "attention": "lssar", "p": 2.0},
                              {"name": "LSSAR best p + LoRA", "attention": "lssar", "p": [2.0, 15.0]}])
    text = run_table(table)
    lines = text.splitlines()
    assert len(lines) == 5 and "alice @32" in lines[0] and "| softmax |  | 0 | 0 | - |" in lines[2]
    runs = sorted(p.name for p in (tmp_path / "table" / "runs").iterdir())
    assert runs == ["lssar-p15", "lssar-p2"]  # p=2 trained once, shared by two rows
    results = json.loads((tmp_path / "table" / "table.json").read_text())
    best = results["LSSAR best p + LoRA"]["cost"]
    losses = {p: json.loads((tmp_path / "table" / "runs" / f"lssar-p{p}" / "finetune.json").read_text())["eval_loss"]
              for p in ("2", "15")}
    assert f"{best['p']:g}" == min(losses, key=losses.get) and best["steps"] == 2
    cached = sorted((tmp_path / "table").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached if p.name != "table.json"]
    assert run_table(table) == text  # everything cached: nothing retrained or re-measured
    assert [p.stat().st_mtime_ns for p in cached if p.name != "table.json"] == stamps
    # --cached: what is measured so far, nothing trained, measured or written; unmeasured rows left out
    (tmp_path / "table" / "softmax" / "eval.json").unlink()
    table.rows.append({"name": "never run", "attention": "lssa"})
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "table").rglob("*.json")}
    partial = run_table(table, measure=False).splitlines()
    assert partial == lines[:2] + lines[3:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "table").rglob("*.json")} == stamps


def test_cli_overrides_take_yaml_values(tmp_path):
    from lssa_hf.cli import build_parser
    from lssa_hf.commands.finetune import overrides, settings

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("p: 6\np_schedule: [[0, 3], [100, 6]]\neval_text: held_out.txt\nseed: 5\n")
    args = build_parser().parse_args(["finetune", "--config", str(yaml_file), "--attention", "lssa", "--no-warm-start",
                                      "--p", "3", "--set", "lr=1e-3", "target_modules=[q_proj, k_proj]",
                                      "eval-text=null", "p_schedule=null"])
    assert {k: v for k, v in overrides(args).items() if v is not None} == {"attention": "lssa", "warm_start": False,
                                                                          "p": 3.0}
    assert settings(args) == {"lr": "1e-3", "target_modules": ["q_proj", "k_proj"], "eval_text": None,
                              "p_schedule": None}
    config = FinetuneConfig.from_yaml(args.config, settings(args), **overrides(args))
    assert config.lr == 1e-3 and not config.warm_start  # YAML 1.1 reads 1e-3 as a string: converted
    assert config.p == 3.0 and config.seed == 5  # flags given replace YAML values, the others stay
    assert config.eval_text is None and config.p_schedule is None  # --set null replaces a YAML value


def test_recipe_default_runs_the_softmax_baseline_without_temperatures():
    recipe = ROOT / "recipes" / "adapt" / "configs" / "smollm2.yaml"
    lssar = FinetuneConfig.from_yaml(recipe)
    assert lssar.attention == "lssar" and lssar.head_temperature
    # the best LSSAR recipe of the baselines table: YaRN x2 composed, softmax kept in layers 0-3
    assert lssar.rope == "yarn:2" and lssar.softmax_layers == [0, 1, 2, 3]
    softmax = FinetuneConfig.from_yaml(recipe, attention="softmax")
    assert not softmax.head_temperature and softmax.rope == "yarn:2"  # the fair baseline: softmax + YaRN x2 + LoRA


def test_table_rows_with_yarn_and_lssar_plus_yarn_past_the_window(checkpoint, tmp_path):
    """The baselines table in small: YaRN without and with LoRA, LSSAR + YaRN, ssmax, at twice the
    tiny model's 256-position window, plus a passkey cell; the trained YaRN models keep YaRN."""
    from lssa_hf.finetune.table import TableConfig, run_table
    from lssa_hf.finetune import load_adapted
    from lssa_hf.rope import rope_of

    base = config(checkpoint, tmp_path, max_steps=2).to_dict()
    for key in ("output_dir", "attention", "p"):
        base.pop(key)
    table = TableConfig(output_dir=str(tmp_path / "table"), base=base, lengths=[128, 512], eval_tokens=512,
                        eval_text={"alice": str(TEXT)}, passkey_lengths=[300], passkey_docs=1,
                        rows=[{"name": "softmax", "attention": "softmax", "train": False},
                              {"name": "YaRN x2", "attention": "softmax", "rope": "yarn:2", "train": False},
                              {"name": "YaRN x2 + LoRA", "attention": "softmax", "rope": "yarn:2"},
                              {"name": "LSSAR + YaRN x2 + LoRA", "attention": "lssar", "p": 5, "rope": "yarn:2"},
                              {"name": "ssmax + LoRA", "attention": "ssmax", "head_temperature": True},
                              {"name": "LSSAR + YaRN x2, calibrated tau", "attention": "lssar", "p": 5,
                               "rope": "yarn:2", "temperature_init": "calibrate", "train": False},
                              {"name": "LSSAR + YaRN x2 + LoRA, calibrated tau", "attention": "lssar", "p": 5,
                               "rope": "yarn:2", "head_temperature": True, "temperature_init": "calibrate"}])
    lines = run_table(table).splitlines()
    assert len(lines) == 9 and lines[0].endswith("| passkey @300 |")
    results = json.loads((tmp_path / "table" / "table.json").read_text())
    assert results["YaRN x2"]["cost"]["rope"] == "yarn:2" and results["softmax"]["cost"]["rope"] is None
    assert results["YaRN x2 + LoRA"]["cost"]["rope"] == "yarn:2" and results["YaRN x2 + LoRA"]["cost"]["steps"] == 2
    assert all(0.0 <= res["passkey"]["300"] <= 1.0 for res in results.values())
    records = [json.loads((p / "finetune.json").read_text()) for p in (tmp_path / "table" / "runs").iterdir()]
    calibrated = next(r for r in records if r["config"].get("temperature_init") == "calibrate")
    fit = calibrated["temperature_init"]
    assert len(fit["tau"]) == 2 and all(a <= b for a, b in zip(fit["mse"], fit["mse_at_1"]))
    assert results["LSSAR + YaRN x2, calibrated tau"]["cost"]["seconds"] > 0  # no training, only the fit
    for attention, rope_type in (("softmax", "yarn:2"), ("lssar", "yarn:2"), ("ssmax", "default")):
        folder = next(p for p in (tmp_path / "table" / "runs").iterdir() if p.name.startswith(attention))
        model, _ = load_adapted(folder)
        assert rope_of(model) == rope_type
        assert lssa_hf.settings_of(model) is None if attention == "softmax" else lssa_hf.settings_of(model).variant == attention


def test_eval_rope_rows_reuse_the_trained_adapter_and_scale_rope_only_for_evaluation(checkpoint, tmp_path):
    """``eval_rope``: the LoRA trained at native RoPE, YaRN set only to evaluate (no second training);
    the cells equal those of the reloaded adapter with apply_rope, and differ from the row without it."""
    from lssa_hf.evaluation import mean_loss
    from lssa_hf.data import blocks, read_text, tokenize
    from lssa_hf.finetune.table import TableConfig, evaluate_row, run_table
    from lssa_hf.rope import apply_rope, rope_of

    base = config(checkpoint, tmp_path, max_steps=2).to_dict()
    for key in ("output_dir", "attention", "p"):
        base.pop(key)
    rows = [{"name": "LSSAR + LoRA", "attention": "lssar", "p": 5},
            {"name": "LSSAR + LoRA, YaRN x2 at evaluation", "attention": "lssar", "p": 5, "eval_rope": "yarn:2"}]
    table = TableConfig(output_dir=str(tmp_path / "table"), base=base, lengths=[512], eval_tokens=512,
                        eval_text={"alice": str(TEXT)}, rows=rows)
    run_table(table)
    runs = list((tmp_path / "table" / "runs").iterdir())
    assert len(runs) == 1  # one training run for both rows
    results = json.loads((tmp_path / "table" / "table.json").read_text())
    plain, scaled = (results[row["name"]] for row in rows)
    assert scaled["cost"]["eval_rope"] == "yarn:2" and "eval_rope" not in plain["cost"]
    assert scaled["cost"]["steps"] == plain["cost"]["steps"] == 2
    model, tokenizer = load_adapted(runs[0])
    assert rope_of(model) == "default"  # the saved model is untouched
    apply_rope(model, "yarn:2")
    ids = tokenize(tokenizer, read_text(str(TEXT)))
    ids = ids[int(len(ids) * table.eval_skip):]
    want = mean_loss(model, blocks(ids, 512, 1))
    assert scaled["loss"]["alice"]["512"] == round(want, 4) != plain["loss"]["alice"]["512"]
    with pytest.raises(ValueError, match="a row without training sets `rope`"):
        evaluate_row(table, {"name": "untrained", "attention": "softmax", "train": False, "eval_rope": "yarn:2"})


def test_length_scale_probe_caps_log_n_and_reports_quarters(checkpoint, tmp_path):
    """recipes/adapt/probe_length_scale.py: the cap changes the loss (it reaches the kernels) and the
    uncapped line is the adapter's plain loss."""
    finetune(config(checkpoint, tmp_path, attention="lssar", p=5.0, max_steps=2))
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "adapt" / "probe_length_scale.py"), "--adapter",
                          str(tmp_path), "--length", "128", "--caps", "none", "4", "--text", str(TEXT)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    lines = [line for line in out.splitlines() if line.startswith("L=128")]
    assert len(lines) == 2 and lines[0].count(" / ") == 3
    plain, capped = (float(line.split("ppl ")[1].split(",")[0]) for line in lines)
    assert plain != capped
    from lssa_hf.data import blocks, read_text, tokenize
    from lssa_hf.evaluation import mean_loss

    model, tokenizer = load_adapted(tmp_path)
    ids = tokenize(tokenizer, read_text(str(TEXT)))
    want = math.exp(mean_loss(model, blocks(ids[int(len(ids) * 0.1):], 128, 1)))
    assert plain == pytest.approx(want, abs=0.006)
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "adapt" / "probe_length_scale.py"), "--adapter",
                          str(tmp_path), "--length", "128", "--caps", "none", "--edges", "32", "64", "--text", str(TEXT)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    line = next(line for line in out.splitlines() if line.startswith("L=128"))
    assert "by positions 0-32 / 32-64 / 64-127 " in line  # 127 predicted tokens; query i sees i + 1 keys
    parts = [float(x) for x in line.split("64-127 ")[1].split(" (")[0].split(" / ")]
    # the ranges' mean losses, weighted by their 32 / 32 / 63 predictions, are the window's
    mean = (32 * math.log(parts[0]) + 32 * math.log(parts[1]) + 63 * math.log(parts[2])) / 127
    assert math.exp(mean) == pytest.approx(plain, rel=1e-3)


def test_layer_probe_swaps_one_layer_at_a_time_and_ranks_the_worst(checkpoint):
    """recipes/adapt/probe_layers.py: each line is the checkpoint with only that layer on LSSAR (checked
    against a model patched here), and the worst-k list is the k highest perplexities."""
    from lssa_hf.data import blocks, read_text, tokenize
    from lssa_hf.evaluation import mean_loss
    from lssa_hf.models import load
    from lssa_hf.patching import set_attention

    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "adapt" / "probe_layers.py"), "--model", str(checkpoint),
                          "--p", "5", "--length", "64", "--windows", "2", "--text", str(TEXT), "--worst", "1", "2"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    lines = [line for line in out.splitlines() if line.startswith("layer ")]
    ppl = [float(line.split("ppl ")[1].split(" ")[0]) for line in lines]
    model, tokenizer = load(str(checkpoint))
    assert len(ppl) == model.config.num_hidden_layers >= 2
    ids = tokenize(tokenizer, read_text(str(TEXT)))
    windows = blocks(ids[int(len(ids) * 0.1):], 64, 2)[:2]
    softmax = math.exp(mean_loss(model, windows))
    assert float(out.split("softmax: ppl ")[1].split()[0]) == pytest.approx(softmax, abs=0.006)
    set_attention(model, "lssar", p=5.0, softmax_layers=list(range(1, len(ppl))))
    assert ppl[0] == pytest.approx(math.exp(mean_loss(model, windows)), abs=0.006)
    assert ppl[0] != pytest.approx(softmax, abs=0.006)  # the swap reached the layer
    ranked = sorted(range(len(ppl)), key=lambda i: -ppl[i])
    assert f"worst 1: softmax_layers: {[ranked[0]]}" in out
    assert f"worst 2: softmax_layers: {sorted(ranked[:2])}" in out


@torch.no_grad()
def test_head_probe_prints_each_heads_error_against_a_float64_reference(checkpoint):
    """probe_layers.py --heads: each head's |LSSAR - softmax|^2 / |softmax|^2 on the softmax model's own
    inputs, checked against float64 references of both attentions on the q/k/v captured here, and the
    worst-k map is the k largest errors."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lssa_hf.data import blocks, read_text, tokenize
    from lssa_hf.models import load
    from reference import reference_attention
    from test_hybrid import reference_softmax

    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "adapt" / "probe_layers.py"), "--model", str(checkpoint),
                          "--p", "5", "--length", "64", "--windows", "2", "--text", str(TEXT), "--heads",
                          "--worst", "1", "3"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    printed = [[float(e) for e in line.split("head errors ")[1].split()] for line in out.splitlines()
               if line.startswith("layer ")]
    model, tokenizer = load(str(checkpoint))
    ids = tokenize(tokenizer, read_text(str(TEXT)))
    windows = blocks(ids[int(len(ids) * 0.1):], 64, 2)[:2]
    sums = {}

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        length = query.shape[2]
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(1, query.shape[1], -1, -1)
        soft = reference_softmax(query, key, value, mask, scaling)
        lssar = reference_attention(query, key, value, mask, variant="lssar", p=5.0)
        err, norm = sums.setdefault(module.layer_idx, [0.0, 0.0])
        sums[module.layer_idx] = [err + ((lssar - soft) ** 2).sum((0, 2, 3)), norm + (soft ** 2).sum((0, 2, 3))]
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)

    AttentionInterface.register("lssa_test_capture", capture)
    model.set_attn_implementation("lssa_test_capture")
    for window in windows:
        model(window[None])
    want = [(err / norm).tolist() for _, (err, norm) in sorted(sums.items())]
    assert len(printed) == len(want) == model.config.num_hidden_layers
    torch.testing.assert_close(torch.tensor(printed), torch.tensor(want, dtype=torch.float32), rtol=0, atol=1.5e-3)
    ranked = sorted(((layer, h) for layer in range(len(want)) for h in range(len(want[0]))),
                    key=lambda key: -want[key[0]][key[1]])
    layer, head = ranked[0]
    assert f"worst 1: softmax_heads: {{{layer}: [{head}]}}" in out
    assert max(max(row) for row in want) > 0.01  # the heads differ from softmax: the check can fail


def scripted_rows(line: list[str]) -> list[str]:
    """Row names one command of a run script passes: after ``--rows``, or after run_table_parts.sh's config."""
    parts = [i for i, word in enumerate(line) if word.endswith("run_table_parts.sh")]
    if parts:
        return [word for word in line[parts[0] + 2:] if word != "--"]
    rows = line[line.index("--rows") + 1:] if "--rows" in line else []
    return rows[:next((i for i, word in enumerate(rows) if word.startswith("-")), len(rows))]


# the run scripts of a table config (run_table_parts.sh is the generic runner they call)
TABLE_SCRIPTS = sorted(p for p in (ROOT / "recipes" / "adapt").glob("run_*.sh") if ".yaml" in p.read_text())


@pytest.mark.parametrize("script", TABLE_SCRIPTS, ids=lambda p: p.name)
def test_run_scripts_name_rows_their_configs_have(script):
    """A row name mistyped in a run script would only fail hours into a background run."""
    import shlex

    from lssa_hf.finetune.table import TableConfig, row_configs

    lines = [shlex.split(line, comments=True) for line in script.read_text().replace("\\\n", " ").splitlines()]
    configs = {word.split("=")[-1] for line in lines for word in line if word.endswith(".yaml")}
    tables = [TableConfig.from_yaml(ROOT / c) for c in configs]
    for table in tables:
        for row in table.rows:
            if row.get("train", True):
                row_configs(table, row)  # every trained row is a valid FinetuneConfig
    names = {row["name"] for table in tables for row in table.rows}
    missing = [row for line in lines for row in scripted_rows(line) if row not in names]
    assert not missing, f"{script.name} names rows its config lacks: {missing}"
