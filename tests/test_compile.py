"""torch.compile(model, fullgraph=True) of a patched model: the kernels are custom ops, so the model
traces in one graph, one dynamic graph serves every length, and it equals eager, forward and backward."""

import torch

import lssa_hf
from lssa_hf import attention
from lssa_hf.kernels import native
from tiny_models import VOCAB, tiny_model


def _loss_and_grads(fn, model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = fn(input_ids=ids, attention_mask=mask)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_patched_llama_equals_eager_without_recompiles(monkeypatch):
    monkeypatch.setattr(attention, "MATERIALIZE_MAX_ELEMENTS", 0)  # every length runs the kernels
    model = tiny_model("llama")
    lssa_hf.patch(model, variant="lssar")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # fullgraph: a graph break fails
    torch._dynamo.reset()
    before = dict(native.calls)
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate((40, 57)):
        ids = torch.randint(3, VOCAB, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, :5] = 0  # left padding: the explicit-mask path (N_i and the plan inside the ops)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # one graph for every length
            got, got_grads = _loss_and_grads(compiled, model, ids, mask)
        want, want_grads = _loss_and_grads(model, model, ids, mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    ran = {k: native.calls[k] - before.get(k, 0) for k in native.calls}
    assert ran.get(native.isa() if native.available() else "torch", 0) > 0, ran  # the kernels ran


def test_eager_kernel_calls_do_not_import_the_compiler():
    """Eager calls bypass the custom-op dispatcher, whose first call imports torch._dynamo (1.5 s of
    a fresh process's first call, #15); under torch.compile the ops are used (test above)."""
    import subprocess
    import sys

    code = ("import sys, torch, lssa_hf\n"
            "q = torch.randn(1, 4, 600, 32, requires_grad=True)\n"
            "mask = torch.ones(600, 600, dtype=torch.bool).tril()\n"
            "for m in (None, mask):\n"
            "    lssa_hf.lssa_attention(q, q, q, m, variant='lssar', backend='native')[0].sum().backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False"
