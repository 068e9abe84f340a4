"""Every situation transformers puts an attention function in, on tiny models of each architecture.

Each check compares two ways of computing the same logits (cached vs full, padded vs alone, packed vs
alone); tests/test_reference_models.py compares patched models with the float64 reference.
"""

import pytest
import torch
from transformers import DynamicCache

import lssa_hf
from tiny_models import CONFIGS, VOCAB, tiny_model

ARCHS = list(CONFIGS)
VARIANTS = ["lssa", "lssar"]
RTOL, ATOL = 1e-5, 1e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(params=[(a, v) for a in ARCHS for v in VARIANTS], ids=lambda x: f"{x[0]}-{x[1]}")
def model(request):
    arch, variant = request.param
    return lssa_hf.patch(tiny_model(arch), variant=variant, p=15.0)


def tokens(length, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def test_patch_is_active(model):
    assert model.config._attn_implementation in VARIANTS
    x = tokens(12)
    with torch.no_grad():
        patched = model(x).logits
        lssa_hf.unpatch(model)
        softmax = model(x).logits
    assert not torch.allclose(patched, softmax, atol=1e-3)


@torch.no_grad()
def test_token_by_token_decoding_matches_full_forward(model):
    x = tokens(14)
    full = model(x).logits
    cache, steps = DynamicCache(config=model.config), []
    for i in range(x.shape[1]):
        out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_chunked_prefill_matches_full_prefill(model):
    x = tokens(15)
    full = model(x).logits
    cache, chunks = DynamicCache(config=model.config), []
    for start in range(0, 15, 4):
        out = model(x[:, start:start + 4], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        chunks.append(out.logits)
    close(torch.cat(chunks, dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(model, side):
    seqs = [tokens(11, seed=1)[0], tokens(7, seed=2)[0], tokens(4, seed=3)[0]]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, span], mask[row, span] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for row, s in enumerate(seqs):
        alone = model(s[None]).logits[0]
        close(batch[row][mask[row].bool()], alone)


@torch.no_grad()
@pytest.mark.parametrize("with_cu_seq_lens", [False, True])
def test_packed_documents_match_each_document_alone(model, with_cu_seq_lens):
    docs = [tokens(6, seed=4)[0], tokens(9, seed=5)[0], tokens(3, seed=6)[0]]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    kwargs = {}
    if with_cu_seq_lens:  # what DataCollatorWithFlattening hands the model
        lengths = torch.tensor([0] + [len(d) for d in docs])
        cu = lengths.cumsum(0).to(torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    packed = model(ids, position_ids=position_ids, **kwargs).logits[0]
    start = 0
    for d in docs:
        close(packed[start:start + len(d)], model(d[None]).logits[0])
        start += len(d)


@torch.no_grad()
def test_generate_runs_and_matches_greedy_decoding(model):
    x = tokens(6)
    out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    # Greedy decoding by full forwards, no cache: must choose the same tokens.
    seq = x
    for _ in range(5):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_backward_gives_finite_gradients(model):
    model.train()
    x = tokens(12, batch=2)
    loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
