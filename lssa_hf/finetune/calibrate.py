"""Per-head temperatures initialised from the softmax checkpoint's own attention (issue #14's
"temperature initialised from the softmax model's attention").

The paper's scale (tau = 1) makes a swapped-in softmax checkpoint attend much flatter than it was
trained to. Before any training, for each attention layer, on the inputs the softmax original gives
that layer: the layer's output under LSSA/LSSAR is compared (MSE) with its softmax output for each
tau of a grid, first one tau for the whole layer, then each head in turn with the others held. Layer
by layer, as the warm start (``warmstart.py``): every layer sees its softmax inputs, so errors do not
compound. Cost: (1 + heads x sweeps) x grid forwards of one attention layer per layer, no backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..patching import base_model, is_patched
from ..temperature import ATTRIBUTE, attention_modules
from .warmstart import ModuleHooks, original_attention

GRID = tuple(2.0 ** (k / 2) for k in range(-2, 11))  # tau = 0.5 ... 32, steps of sqrt(2)


class LayerCalls(ModuleHooks):
    """Hooks recording each attention module's full call (args, kwargs) and its output."""

    def __init__(self, modules):
        self.modules, self.calls, self.outputs, self.handles = modules, {}, {}, []

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.calls[i] = (args, dict(kwargs))
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.outputs[i] = (output[0] if isinstance(output, tuple) else output).float()
        return hook


def _layer_error(module, call, target) -> float:
    args, kwargs = call
    out = module(*args, **kwargs)
    return F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), target).item()


def _best_tau(module, call, target, log_tau: torch.Tensor, heads, grid) -> float:
    """Set ``log_tau[heads]`` to the grid value with the smallest layer error; returns that error."""
    best = (math.inf, None)
    for tau in grid:
        log_tau[heads] = math.log(tau)
        best = min(best, (_layer_error(module, call, target), tau))
    log_tau[heads] = math.log(best[1])
    return best[0]


@torch.no_grad()
def calibrate_temperatures(model, input_ids: torch.Tensor, grid=GRID, max_sweeps: int = 4) -> dict:
    """Set every layer's per-head temperature (``patch(..., head_temperature=True)``) to the grid
    value whose LSSA/LSSAR layer output best matches the softmax layer's on ``input_ids`` (coordinate
    descent over heads: at most ``max_sweeps`` sweeps, until no head's tau changes).

    Returns {"tau": per-layer lists of the chosen tau, "mse_at_1": the per-layer error at tau = 1,
    "mse": after}."""
    if not is_patched(model):
        raise ValueError("calibrate_temperatures compares LSSA layers with their softmax originals: patch the "
                         "model first (lssa_hf.patch(model, head_temperature=True)).")
    modules = attention_modules(base_model(model))
    if not all(hasattr(m, ATTRIBUTE) for m in modules):
        raise ValueError("calibrate_temperatures sets per-head temperatures: patch with head_temperature=True.")
    was_training = model.training
    model.eval()
    recorder = LayerCalls(modules)
    with recorder, original_attention(model):
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    result = {"tau": [], "mse_at_1": [], "mse": []}
    for i, module in enumerate(modules):
        log_tau = getattr(module, ATTRIBUTE).log_temperature
        call, target = recorder.calls[i], recorder.outputs[i]
        log_tau.zero_()
        result["mse_at_1"].append(_layer_error(module, call, target))
        error = _best_tau(module, call, target, log_tau, slice(None), grid)  # one tau for the layer
        for _ in range(max_sweeps):  # then each head, the others held, until no head moves
            before = log_tau.clone()
            for head in range(log_tau.numel()):
                error = _best_tau(module, call, target, log_tau, head, grid)
            if torch.equal(before, log_tau):
                break
        result["tau"].append([round(t, 4) for t in log_tau.exp().tolist()])
        result["mse"].append(error)
    model.train(was_training)
    return result
