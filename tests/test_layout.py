"""The library's layout rules: the math imports without transformers, the library never imports its
command line, one verb switches attention, settings and backends resolve in one place, and the
evaluation's sliced losses equal the model's own loss."""

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import lssa_hf
from lssa_hf import attention, evaluation
from lssa_hf.settings import ATTENTIONS, BACKEND_ENV, LSSAConfig, resolve_backend

ROOT = Path(lssa_hf.__file__).resolve().parent


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_math_imports_without_transformers_and_import_lssa_hf_still_registers():
    out = _python("import sys, lssa_hf.functional, lssa_hf.attention, lssa_hf.kernels.blocked, "
                  "lssa_hf.kernels.flex, lssa_hf.kernels.ops, lssa_hf.kernels.native, lssa_hf.kernels.triton_lssa, lssa_hf.settings; "
                  "print('transformers' in sys.modules)")
    assert out == "False"
    # transformers imported after lssa_hf, and before it: both register the backends
    for code in ("import lssa_hf; from transformers import AttentionInterface as A",
                 "from transformers import AttentionInterface as A; import lssa_hf"):
        assert _python(code + "; print(sorted(set(A._global_mapping) & {'lssa', 'lssar'}))") == "['lssa', 'lssar']"


def test_no_library_module_imports_the_command_line():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "commands" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module] + [f"{module}.{a.name}" for a in node.names]
                if node.level and rel.parent == Path(".") and module == "":  # from . import commands
                    names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "commands" or ".commands" in n or n.startswith("commands.") for n in names):
                offenders.append(str(rel))
    assert not offenders


def test_backend_precedence_argument_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto") == "auto" and resolve_backend("blocked") == "blocked"
    monkeypatch.setenv(BACKEND_ENV, "materialized")
    assert resolve_backend("auto") == "materialized"  # the environment forces what "auto" would choose
    assert resolve_backend("blocked") == "blocked"  # an explicit argument wins
    calls = []
    real = attention.blocked.blocked_attention
    monkeypatch.setattr(attention.blocked, "blocked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 9, 8)
    attention.lssa_attention(q, q, q, backend="blocked")
    attention.lssa_attention(q, q, q)
    assert calls == [1]
    with pytest.raises(ValueError, match="Unknown LSSA backend"):
        resolve_backend("fast")


def test_set_attention_switches_and_update_settings_reaches_every_layer(monkeypatch):
    from lssa_hf.integrations import hf_attention

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
    assert "softmax" in ATTENTIONS
    lssa_hf.set_attention(model, "lssar", p=4.0)
    assert lssa_hf.settings_of(model) == LSSAConfig(variant="lssar", p=4.0)
    seen = []
    real = hf_attention.lssa_attention
    monkeypatch.setattr(hf_attention, "lssa_attention", lambda *a, **k: seen.append(k["p"]) or real(*a, **k))
    with torch.no_grad():
        model(ids)
        lssa_hf.update_settings(model, p=2.0)
        model(ids)
    assert seen == [4.0, 4.0, 2.0, 2.0]  # two layers, parsed settings follow the update
    with pytest.raises(ValueError, match="use lssa_hf.patch"):
        lssa_hf.update_settings(model, variant="lssa")
    lssa_hf.set_attention(model, "softmax", p=3.0)  # LSSA settings do not apply to softmax
    assert not lssa_hf.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown LSSA variant or attention"):
        lssa_hf.set_attention(model, "flash")
    with pytest.raises(TypeError, match="Unknown attention settings"):
        lssa_hf.set_attention(model, "lssa", power=3)
    with pytest.raises(ValueError, match="does not use LSSA"):
        lssa_hf.update_settings(model, p=3.0)


def _check_losses(model, ids):
    with torch.no_grad():
        want = model(ids, labels=ids).loss
    got = evaluation.token_losses(model, ids)
    assert got.shape == (ids.shape[0], ids.shape[1] - 1)
    torch.testing.assert_close(got.mean(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_sliced_losses_equal_the_models_own_loss(name, monkeypatch):
    """Losses from the final hidden states in slices of positions (never the L x vocab logits) equal
    model(ids, labels=ids).loss; Gemma2 soft-caps its logits (cap 1: the cap matters here)."""
    monkeypatch.setattr(evaluation, "LOSS_SLICE", 5)  # slices that do not divide L - 1
    model = tiny_model(name, **({"final_logit_softcapping": 1.0} if name == "gemma2" else {}))
    ids = torch.randint(3, VOCAB, (2, 23))
    _check_losses(model, ids)
    assert model not in evaluation._FULL_LOGITS  # the sliced path ran
    lssa_hf.patch(model, variant="lssar")
    _check_losses(model, ids)


def test_sliced_losses_with_logit_scales_and_peft(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig

    monkeypatch.setattr(evaluation, "LOSS_SLICE", 4)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    ids = torch.randint(3, VOCAB, (1, 17))
    for config in (CohereConfig(**common, logit_scale=0.25), GraniteConfig(**common, logits_scaling=3.0)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        _check_losses(model, ids)
        assert model not in evaluation._FULL_LOGITS
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False)).eval()
    _check_losses(peft_model, ids)
    assert evaluation.inner_model(peft_model) not in evaluation._FULL_LOGITS


def test_unknown_logit_transform_falls_back_to_full_logits(monkeypatch, caplog):
    """A logit transform lssa_hf does not know is detected on the last position and the losses come from
    the full logits (here: a Llama whose config claims a soft-cap its forward does not apply)."""
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 0.5
    ids = torch.randint(3, VOCAB, (1, 20))
    with caplog.at_level(logging.WARNING, logger="lssa_hf.evaluation"):
        _check_losses(model, ids)
    assert model in evaluation._FULL_LOGITS and "full (L x vocab) logits" in caplog.text
