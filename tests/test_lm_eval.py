"""lm-evaluation-harness integration: the lssa-hf model type through the stock harness (CLI entry and
``simple_evaluate``), our offline long-context tasks at 8x the model's position limit, the no-silent-
truncation guarantee, batch-size invariance and the score-vs-length report. Tiny models, offline."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups (model sha, cards) from the harness

import pytest
import torch

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AttentionInterface, PreTrainedTokenizerFast  # noqa: E402

import lssa_hf  # noqa: E402
from lssa_hf.data import builtin_text  # noqa: E402
from lssa_hf.harness import TASKS_DIR, task_manager  # noqa: E402
from lssa_hf.harness.model import LSSAHFLM, TruncationError  # noqa: E402
from lssa_hf.harness.report import collect, write_report  # noqa: E402
from lssa_hf.lm_eval_tasks import utils as task_utils  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

POSITIONS = 64  # the tiny model's max_position_embeddings
LENGTH = 8 * POSITIONS  # our tasks run at 512 tokens
TASKS = [f"passkey_{LENGTH}", f"passkey_ll_{LENGTH}", f"multikey_{LENGTH}", f"ppl_{LENGTH}"]
TEMPLATES = {"passkey": "_passkey_template_yaml", "passkey_ll": "_passkey_ll_template_yaml",
             "multikey": "_multikey_template_yaml", "ppl": "_ppl_template_yaml"}
META = {"num_samples": 4, "num_windows": 4}


def byte_level_tokenizer(texts):
    """A small byte-level BPE trained on the spot: offline, lossless decode, offsets for the ppl task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Folder with a tiny softmax Llama (64 positions) and its tokenizer, as `pretrained=` takes it."""
    path = tmp_path_factory.mktemp("tiny_llama")
    u = task_utils
    tokenizer = byte_level_tokenizer([u.INTRO, u.FILLER * 20, u.NEEDLE.format(key="12345"), u.QUESTION,
                                      u.MULTI_NEEDLE, u.MULTI_QUESTION, " ".join(u.DOORS), "0123456789",
                                      builtin_text()[:200_000]])
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=POSITIONS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Our task templates at 512 tokens, the way users add their own lengths (--include_path)."""
    path = tmp_path_factory.mktemp("tasks")
    for family, template in TEMPLATES.items():
        (path / f"{family}_{LENGTH}.yaml").write_text(
            f"include: {TASKS_DIR / template}\ntask: {family}_{LENGTH}\n"
            f"dataset_kwargs:\n  seq_length: {LENGTH}\n")
    return path


@pytest.fixture(scope="module")
def manager(task_dir, checkpoint):
    return task_manager(include_path=task_dir, metadata={"tokenizer": str(checkpoint), **META})


@pytest.fixture
def attention_spy(monkeypatch):
    """Records the key length of every call to the LSSA backends."""
    seen = []
    for name in lssa_hf.VARIANTS:
        forward = AttentionInterface._global_mapping[name]

        def spy(module, query, key, *args, _forward=forward, _name=name, **kwargs):
            seen.append((_name, key.shape[-2]))
            return _forward(module, query, key, *args, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    return seen


def scores(results, task):
    return {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}


def test_model_type_is_registered_and_takes_lssa_settings(checkpoint):
    assert get_model("lssa-hf") is LSSAHFLM
    lm = LSSAHFLM(pretrained=str(checkpoint), variant="lssa", backend="auto", device="cpu")
    assert lssa_hf.settings_of(lm.model).variant == "lssa" and lm.backend == "causal"
    lm = LSSAHFLM(pretrained=str(checkpoint), p=4, device="cpu")  # softmax checkpoint: lssar by default
    assert lssa_hf.settings_of(lm.model) == lssa_hf.LSSAConfig("lssar", 4.0, "auto")
    assert not lssa_hf.is_patched(LSSAHFLM(pretrained=str(checkpoint), variant="softmax", device="cpu").model)
    with pytest.raises(ValueError, match="Unknown LSSA variant"):
        LSSAHFLM(pretrained=str(checkpoint), variant="flash", device="cpu")


def test_hflm_keeps_the_patch_of_a_model_passed_in(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lssa_hf.patch(AutoModelForCausalLM.from_pretrained(checkpoint), variant="lssar", p=3.0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for lm in (HFLM(pretrained=model, tokenizer=tokenizer, device="cpu"),
               LSSAHFLM(pretrained=model, tokenizer=tokenizer, device="cpu")):
        assert lm.model is model and lssa_hf.settings_of(lm.model) == lssa_hf.LSSAConfig("lssar", 3.0)
    x = torch.tensor([tokenizer("The pass key is 12345.")["input_ids"]])
    with torch.no_grad():  # the harness's forward is the patched model's forward
        torch.testing.assert_close(lm._model_call(x), model(x).logits)


def test_no_request_is_truncated_silently(checkpoint):
    text = task_utils.FILLER * 40  # ~1000 tokens, 16x the position limit
    ll = Instance("loglikelihood", {}, (text, " 12345"), 0)
    rolling = Instance("loglikelihood_rolling", {}, (text,), 0)
    gen = Instance("generate_until", {}, (text, {"until": ["\n"], "max_gen_toks": 4}), 0)
    strict = LSSAHFLM(pretrained=str(checkpoint), max_length=128, device="cpu")
    for method, request in ((strict.loglikelihood, ll), (strict.loglikelihood_rolling, rolling),
                            (strict.generate_until, gen)):
        with pytest.raises(TruncationError, match="max_length=128"):
            method([request])
    # max_length=auto (the default) grows to the longest request instead.
    auto = LSSAHFLM(pretrained=str(checkpoint), device="cpu")
    n = len(auto.tok_encode(text))
    assert n > 8 * POSITIONS
    (logprob, _), = auto.loglikelihood([ll])
    assert auto.max_length >= n
    # truncation=True is the harness's own behaviour (cut from the left), on request only.
    lenient = LSSAHFLM(pretrained=str(checkpoint), max_length=128, truncation=True, device="cpu")
    (cut, _), = lenient.loglikelihood([ll])
    assert cut != pytest.approx(logprob)


def evaluate(checkpoint, manager, batch_size, variant="lssar"):
    return lm_eval.simple_evaluate(
        model="lssa-hf", model_args=f"pretrained={checkpoint},variant={variant},p=8", tasks=TASKS,
        task_manager=manager, batch_size=batch_size, device="cpu", log_samples=True)


def test_python_api_runs_all_tasks_at_8x_the_position_limit_with_lssa(checkpoint, manager, attention_spy):
    one = evaluate(checkpoint, manager, batch_size=1)
    assert one["config"]["attention"] == "lssar" and one["config"]["lssa_p"] == 8.0
    assert one["config"]["max_length"] >= LENGTH
    assert {name for name, _ in attention_spy} == {"lssar"}
    assert max(n for _, n in attention_spy) >= LENGTH - 16  # whole documents, no 64-token windows
    for task in TASKS:
        assert len(one["samples"][task]) == 4
    assert set(scores(one, f"passkey_{LENGTH}")) == {"exact_match,none"}
    assert set(scores(one, f"passkey_ll_{LENGTH}")) == {"acc,none", "key_logprob,none"}
    ppl = scores(one, f"ppl_{LENGTH}")
    assert 1 < ppl["token_perplexity,none"] < 10 * 400  # a random model: near the vocabulary size

    four = evaluate(checkpoint, manager, batch_size=4)  # padding must not change any score
    for task in TASKS:
        for metric, value in scores(one, task).items():
            assert scores(four, task)[metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
        responses = lambda r: [s["filtered_resps"] for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])]
        if "ppl" not in task and "_ll_" not in task:
            assert responses(one) == responses(four), task


def test_cli_entry_runs_tasks_and_writes_the_report(checkpoint, task_dir, tmp_path, attention_spy, capsys):
    from lssa_hf.cli import main

    out = tmp_path / "out"
    for variant in ("softmax", "lssa"):
        main(["eval", "--model", "lssa-hf", "--model_args", f"pretrained={checkpoint},variant={variant}",
              "--tasks", f"passkey_{LENGTH},ppl_{LENGTH}", "--include_path", str(task_dir),
              "--metadata", json.dumps({"num_samples": 2, "num_windows": 1}),
              "--device", "cpu", "--batch_size", "1", "--output_path", str(out)])
    assert {name for name, _ in attention_spy} == {"lssa"}  # softmax runs never reach our backends
    assert max(n for _, n in attention_spy) >= LENGTH - 16
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 2
    assert [json.loads(f.read_text())["config"]["attention"] for f in files] == ["softmax", "lssa"]
    table = (out / "lssa_report.md").read_text()
    assert re.search(rf"\| passkey: exact_match \| {LENGTH} \|", table)
    assert "tiny_llama" in table and " softmax |" in table and " lssa |" in table
    assert (out / "lssa_report.png").stat().st_size > 1000
    assert main(["eval", "report", str(out), "--metrics", "token_perplexity"]) == 0
    assert "passkey" not in (out / "lssa_report.md").read_text()
    capsys.readouterr()


def test_task_documents_have_their_length_and_needles(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    docs = task_utils.passkey(LENGTH, num_samples=4, tokenizer=tokenizer)["test"]
    assert [d["depth"] for d in docs] == [0.0, 0.5, 0.25, 0.75]
    unit = task_utils.n_tokens(tokenizer, task_utils.FILLER)
    for d in docs:
        assert LENGTH - 2 * unit <= d["n_tokens"] <= LENGTH
        assert d["input"].endswith(task_utils.QUESTION) and f"The pass key is {d['target']}." in d["input"]
    multi = task_utils.multikey(LENGTH, num_samples=2, num_keys=5, tokenizer=tokenizer)["test"]
    for d in multi:
        assert len(re.findall(r"door is (\d{5})", d["input"])) == 5 and d["target"] in d["input"]
    windows = task_utils.ppl_windows(LENGTH, num_windows=3, tokenizer=tokenizer)["test"]
    assert len(windows) == 3 and all(abs(d["n_tokens"] - LENGTH) <= 1 for d in windows)
    with pytest.raises(ValueError, match="tokenizer"):
        task_utils.passkey(LENGTH)
    with pytest.raises(ValueError, match="fewer than one window"):
        task_utils.ppl_windows(10**7, tokenizer=tokenizer)


def test_report_has_one_line_per_attention(tmp_path):
    for i, (attention, values) in enumerate({"softmax": (1.0, 0.0), "lssa": (1.0, 0.5), "lssar": (1.0, 1.0)}.items()):
        run = tmp_path / "m" / f"results_2026-01-0{i + 1}.json"
        run.parent.mkdir(exist_ok=True)
        run.write_text(json.dumps({
            "config": {"model_args": {"pretrained": "smollm2"}, "attention": attention},
            "results": {"passkey_1k": {"exact_match,none": values[0]}, "passkey_8k": {"exact_match,none": values[1]},
                        "passkey_sweep": {"alias": "passkey_sweep"}},
            "configs": {"passkey_1k": {"dataset_kwargs": {"seq_length": 1024}}}}))
    found = collect(tmp_path)
    assert found["passkey", "exact_match"] == {"smollm2 softmax": {1024: 1.0, 8192: 0.0},
                                               "smollm2 lssa": {1024: 1.0, 8192: 0.5},
                                               "smollm2 lssar": {1024: 1.0, 8192: 1.0}}
    table, image = write_report(tmp_path)
    assert "| passkey: exact_match | 1K | 8K |" in table.read_text() and image.suffix == ".png"


def test_ruler_tasks_get_a_loadable_tokenizer_from_the_offline_alias(tmp_path, monkeypatch):
    """RULER's niah_* builders load the tokenizer by name (``tokenizer``, else ``pretrained``); the
    alias "smollm2" is no hub name, so ``lssa-hf eval`` names a saved local folder instead."""
    import argparse

    from lssa_hf import models
    from lssa_hf.commands.eval import fill_task_tokenizer

    monkeypatch.setattr(models, "TOKENIZER_CACHE", tmp_path)
    args = argparse.Namespace(model_args={"pretrained": "smollm2", "variant": "lssar"},
                              metadata={"max_seq_lengths": [256]})
    fill_task_tokenizer(args)
    folder = args.metadata["tokenizer"]
    assert folder.startswith(str(tmp_path)) and args.metadata["max_seq_lengths"] == [256]
    from lm_eval.tasks.ruler.niah_utils import niah_single_1

    docs = niah_single_1(**{**args.model_args, **args.metadata})["test"]
    assert len(docs) > 0 and all(128 < d["length"] <= 256 for d in docs.select(range(4)))  # sized in tokens
    told = argparse.Namespace(model_args={"pretrained": "smollm2", "tokenizer": "mine"}, metadata={})
    fill_task_tokenizer(told)  # a tokenizer the user named wins
    assert "tokenizer" not in told.metadata
    hub = argparse.Namespace(model_args={"pretrained": "HuggingFaceTB/SmolLM2-135M"}, metadata={})
    fill_task_tokenizer(hub)  # hub names load as they are
    assert "tokenizer" not in hub.metadata
