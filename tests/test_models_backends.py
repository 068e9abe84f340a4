"""Every kernel backend through real (tiny) transformers models.

tests/test_models.py runs the materialised backend (tiny models stay under MATERIALIZE_MAX_ELEMENTS);
here ``LSSA_BACKEND`` forces each kernel, strips are shrunk to 4 query rows (so masks, windows and
caches cross strip boundaries), and a spy checks that the forced kernel really ran. Checks: float64
logits and parameter gradients against the float64 reference under padding and sliding windows;
cached decoding and chunked prefill against the full forward; batched, differently left-padded
``generate()`` past the sliding window against each sequence alone; packed documents against each
document alone. Flex runs on CPU only for causal LSSA inference; elsewhere a forced flex runs the
native strips (``attention.lssa_attention``), which the spy accepts. Triton runs under its interpreter
on CPU (TRITON_INTERPRET=1; slow, so only the default set's cases).
"""

import pytest
import torch
from transformers import DynamicCache

import lssa_hf
from lssa_hf import attention
from lssa_hf.kernels import blocked, flex, native, triton_lssa
import test_models
from test_reference_models import reference_model_logits
from tiny_models import VOCAB, tiny_model

ARCHS = ["llama", "mistral", "gemma3", "gpt2"]  # GQA; sliding window 5; mixed window-4 layers; MHA
KERNELS = ["blocked", "native", "flex", "triton"]
VARIANTS = [("lssa", 15.0), ("lssar", 15.0)]
# Run by default (the rest is the slow sweep, `python -m pytest -m slow`): every architecture on the
# pure-torch and native strips, two on flex and the (interpreted, slow) triton kernels.
FAST = {"blocked": ARCHS, "native": ARCHS, "flex": ["llama", "mistral"], "triton": ["mistral"]}
COMBOS = [pytest.param((k, a, v), id=f"{k}-{a}-{v[0]}", marks=() if a in FAST[k] else pytest.mark.slow)
          for k in KERNELS for a in ARCHS for v in VARIANTS]


@pytest.fixture(params=COMBOS)
def case(request, monkeypatch):
    """(kernel, arch, (variant, p)): force the kernel, with 4-row strips, and check which paths ran."""
    name, arch, variant_p = request.param
    if name == "native" and not native.available():
        pytest.skip(f"native strips unavailable: {native.unavailable_reason()} (tests/test_kernel_availability.py)")
    if name == "triton":
        if not triton_lssa.available():
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(attention.BACKEND_ENV, name)
    monkeypatch.setattr(blocked, "MIN_BLOCK_Q", 4)
    monkeypatch.setattr(blocked, "DEFAULT_BUDGET", 1)
    ran = {"materialized": 0, "blocked": 0, "native": 0, "flex": 0, "triton": 0}

    def spy(key, fn):
        def call(*args, **kwargs):
            ran[key(kwargs)] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(attention, "_materialized", spy(lambda kw: "materialized", attention._materialized))
    monkeypatch.setattr(blocked, "blocked_attention",
                        spy(lambda kw: "blocked" if kw["impl"] == "torch" else "native", blocked.blocked_attention))
    monkeypatch.setattr(flex, "run", spy(lambda kw: "flex", flex.run))
    monkeypatch.setattr(triton_lssa, "triton_attention", spy(lambda kw: "triton", triton_lssa.triton_attention))
    calls = native.calls.copy()
    yield name, arch, variant_p
    assert ran["materialized"] == 0, ran
    allowed = {"flex": ("flex", "native")}.get(name, (name,))
    assert sum(ran[k] for k in allowed) > 0 and sum(ran.values()) == sum(ran[k] for k in allowed), ran
    if name == "native":  # the C++ strips ran, not the pure-torch fallback inside the op
        assert native.calls[native.isa()] > calls[native.isa()] and native.calls["torch"] == calls["torch"]


def tokens(length, batch=1, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def patched(arch, variant, p, dtype=torch.float32):
    return lssa_hf.patch(tiny_model(arch).to(dtype), variant=variant, p=p)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = tokens(n, seed=seed + row)[0]
        mask[row, width - n:] = 1
    return ids, mask


def test_logits_and_gradients_equal_the_float64_reference(case):
    """Left padding + sliding windows + 4-row strips, forward and backward, against float64 (the
    flex and triton kernels in float32, the precision they compute in)."""
    kernel, arch, (variant, p) = case
    dtype = torch.float64 if kernel in ("blocked", "native") else torch.float32
    model = patched(arch, variant, p, dtype)  # eval: no dropout (GPT-2 has some)
    ids, pad = left_padded([13, 9, 4])
    position_ids = (pad.cumsum(-1) - 1).clamp_min(0)
    keep = pad.bool()
    weights = torch.randn(keep.sum(), VOCAB, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(fn):
        model.zero_grad()
        logits = fn()
        (logits[keep] * weights).sum().backward()
        return logits.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    got, got_grads = run(lambda: model(ids, attention_mask=pad, position_ids=position_ids).logits)
    want, want_grads = run(lambda: reference_model_logits(model, ids, pad, position_ids, variant, p))
    tol = 1e-9 if dtype == torch.float64 else 1e-5  # float32: a few ulp of the logits' scale (~0.1-1)
    close(got[keep], want[keep], tol)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 4
    for name in want_grads:  # relative to the largest entry of each gradient
        scale = max(want_grads[name].abs().max().item(), 1e-3)
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=10 * tol * scale)


@torch.no_grad()
def test_cached_decoding_and_chunked_prefill_equal_the_full_forward(case):
    _, arch, (variant, p) = case
    model = patched(arch, variant, p)
    x = tokens(14)  # past every sliding window (4-6)
    full = model(x).logits
    for step in (1, 4):  # token by token; chunked prefill
        cache, parts = DynamicCache(config=model.config), []
        for start in range(0, x.shape[1], step):
            out = model(x[:, start:start + step], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits)
        close(torch.cat(parts, dim=1), full)


@torch.no_grad()
def test_left_padded_batched_generate_equals_each_sequence_alone(case):
    _, arch, (variant, p) = case
    model = patched(arch, variant, p)
    lengths = [9, 5, 2]
    ids, pad = left_padded(lengths, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=pad, **kwargs)
    for row, n in enumerate(lengths):  # 9 + 6 tokens: past the window
        alone = model.generate(ids[row:row + 1, -n:], **kwargs)
        assert torch.equal(batch.sequences[row, -6:], alone.sequences[0, -6:])
        for step_batch, step_alone in zip(batch.scores, alone.scores):
            close(step_batch[row], step_alone[0], 1e-4)


@pytest.mark.parametrize("with_cu_seq_lens", [False, True])
def test_packed_documents_equal_each_document_alone(case, with_cu_seq_lens):
    _, arch, (variant, p) = case
    test_models.test_packed_documents_match_each_document_alone(patched(arch, variant, p), with_cu_seq_lens)


@torch.no_grad()
def test_forced_flex_runs_flex_for_causal_lssa_inference(monkeypatch):
    if not flex.available():
        pytest.skip("flex_attention unavailable in this torch")
    calls = []
    real = flex.run
    monkeypatch.setattr(flex, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(attention.BACKEND_ENV, "flex")
    model = patched("llama", "lssa", 15.0)
    x = tokens(20)
    got = model(x).logits
    assert calls, "flex did not run"
    monkeypatch.setenv(attention.BACKEND_ENV, "materialized")
    close(got, model(x).logits)


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_auto_picks_a_kernel_above_the_threshold_in_a_model(monkeypatch, variant):
    """With the threshold crossed (B*H*L*L = 2*4*24*24 > 1000), auto runs a kernel, forward and
    backward, and equals the materialised model."""
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    monkeypatch.setattr(attention, "MATERIALIZE_MAX_ELEMENTS", 1000)
    calls = []
    real = blocked.blocked_attention
    monkeypatch.setattr(blocked, "blocked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = patched("mistral", variant, 15.0).train()
    x = tokens(24, batch=2)
    loss = model(x, labels=x).loss
    loss.backward()
    assert calls
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    monkeypatch.setattr(attention, "MATERIALIZE_MAX_ELEMENTS", 1 << 21)
    model.zero_grad()
    want = model(x, labels=x).loss
    want.backward()
    close(loss, want)
    for n, q in model.named_parameters():
        if q.grad is not None:
            close(grads[n], q.grad, 1e-4)


@torch.no_grad()
def test_output_attentions_through_a_model_are_normalised_lssa_weights():
    model = patched("mistral", "lssar", 15.0)
    ids, pad = left_padded([10, 6])
    out = model(ids, attention_mask=pad, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for w in out.attentions:
        assert w.shape == (2, 4, 10, 10)
        assert torch.all(w[1, :, :, :4] == 0)  # padded keys
        assert torch.all(w.triu(1) == 0)  # causal
        assert torch.all(w[..., :, :][:, :, 9, :4] == 0)  # window 5: the last query sees keys 5-9
        sums = w[pad.bool()[:, None, :].expand(2, 4, 10)].sum(-1)
        close(sums, torch.ones_like(sums))


@torch.no_grad()
@pytest.mark.parametrize("load", [dict(device_map="cpu"), dict(device_map="auto"), dict(dtype=torch.bfloat16)])
def test_loading_with_device_map_or_dtype_keeps_lssa(tmp_path, load):
    model = patched("llama", "lssar", 5.0)
    model.save_pretrained(tmp_path)
    loaded = lssa_hf.from_pretrained(str(tmp_path), **load)
    assert lssa_hf.settings_of(loaded) == lssa_hf.LSSAConfig("lssar", 5.0)
    x = tokens(10)
    tol = 5e-2 if "dtype" in load else 1e-6
    close(loaded(x).logits.float(), model(x).logits, tol)
