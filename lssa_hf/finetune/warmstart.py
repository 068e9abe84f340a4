"""Attention transfer (LoLCATs-style warm start): before LoRA on the LM loss, train only the q/k
LoRA so that every layer's LSSA attention output matches the original softmax layer's output.

Teacher and student are one peft model: with the adapters disabled and the original attention
restored it *is* the frozen softmax checkpoint, so no copy of the weights is needed. Layer-wise, as in
LoLCATs: each student attention layer receives the teacher's input to that layer (recorded by a
pre-hook), so the per-layer errors do not compound and each layer's q/k learn from their own target.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..evaluation import cheap_forward_kwargs
from ..patching import base_model, is_patched, patch, settings_of, unpatch
from ..temperature import reattach, remove_temperatures
from .lora import attention_modules
from .optim import AdaptTrainer, is_temperature


@contextmanager
def original_attention(model):
    """Run ``model`` with the attention it had before ``patch`` (softmax), then patch it back with
    the same learned temperatures (unpatch alone would drop them)."""
    settings = settings_of(model)
    if settings is None:
        yield model
        return
    kept = remove_temperatures(base_model(model))
    unpatch(model)
    try:
        yield model
    finally:
        reattach(kept)
        patch(model, **settings.to_dict())


@contextmanager
def frozen_original(model):
    """The peft ``model`` as the checkpoint it started from: adapters off, original attention, no grad.

    peft's ``disable_adapter`` re-enables gradients on *every* adapter parameter when it exits, which
    would silently undo the q/k-only selection of the warm start: the flags are put back here.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.no_grad(), model.disable_adapter(), original_attention(model):
            yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class ModuleHooks:
    """Context manager: a pre-hook (with kwargs) ``self._pre(i)`` and a forward hook ``self._post(i)``
    on each of ``self.modules``, removed on exit."""

    modules: list
    handles: list

    def __enter__(self):
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class AttentionTaps(ModuleHooks):
    """Hooks on every attention module. "record": keep the layer's input and output; "replay": feed
    the recorded input instead of the model's own and keep the output."""

    def __init__(self, model):
        self.modules = attention_modules(model)
        if not self.modules:
            raise ValueError(f"No attention modules found in {type(base_model(model)).__name__}.")
        self.mode, self.inputs, self.outputs, self.handles = None, {}, {}, []

    def _pre(self, i):
        def hook(module, args, kwargs):
            if self.mode == "record":
                self.inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            elif self.mode == "replay":
                if args:
                    return (self.inputs[i], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self.inputs[i]}
            return None
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output  # (attn_output, weights)
        return hook

    def run(self, model, mode: str, **inputs) -> list[torch.Tensor]:
        self.mode, self.outputs = mode, {}
        try:
            model(**inputs)
        finally:
            self.mode = None
        return [self.outputs[i] for i in range(len(self.modules))]


def transfer_losses(model, input_ids, taps: AttentionTaps, student=None) -> torch.Tensor:
    """Per-layer MSE between the LSSA layer outputs of ``student`` (default ``model``; a DDP wrapper
    of it during training) and the softmax outputs of the frozen original, on the same layer inputs."""
    inputs = {"input_ids": input_ids, **cheap_forward_kwargs(model)}  # only the hooks matter
    with frozen_original(model):
        targets = taps.run(model, "record", **inputs)
    outputs = taps.run(student if student is not None else model, "replay", **inputs)
    return torch.stack([F.mse_loss(o.float(), t.float()) for o, t in zip(outputs, targets)])


@torch.no_grad()
def layer_mse(model, dataset, n_blocks: int = 4) -> list[float]:
    """Mean per-layer attention-output MSE (LSSA vs softmax) on the first ``n_blocks`` of ``dataset``."""
    if not is_patched(model):
        raise ValueError("The attention transfer compares an LSSA model with its softmax original: patch it first.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = None
    with AttentionTaps(model) as taps:
        rows = dataset[: n_blocks]["input_ids"]
        for row in rows:
            losses = transfer_losses(model, row[None].to(device), taps)
            total = losses if total is None else total + losses
    model.train(was_training)
    return (total / len(rows)).tolist()


class AttentionTransferTrainer(AdaptTrainer):
    """A Trainer whose loss is the mean per-layer attention-output MSE instead of the LM loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taps = AttentionTaps(self.model).__enter__()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = transfer_losses(self.model, inputs["input_ids"], self.taps, student=model).mean()
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def close(self) -> None:
        self.taps.__exit__(None, None, None)


def qk_only(model, qk_targets: list[str]) -> dict:
    """Freeze every trainable parameter except what forms the scores: the LoRA matrices of the q/k
    projections and learned per-head temperatures. Returns the previous requires_grad flags for
    ``restore``."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        module = name.split(".lora_", 1)[0]
        qk_lora = ".lora_" in name and any(module.endswith(t) for t in qk_targets)
        param.requires_grad = qk_lora or (flags[name] and is_temperature(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"No LoRA parameters on the q/k projections {qk_targets}.")
    return flags


def restore(model, flags: dict) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = flags[name]
