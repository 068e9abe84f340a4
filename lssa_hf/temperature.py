"""A learnable per-head temperature of LSSA's length scale: s = tau_h log(d) log(N_i) <q^, k^>.

A softmax checkpoint swapped to LSSA sees flatter attention than it was trained for (cosines are
small, the paper's scale is fixed). ``patch(model, head_temperature=True)`` gives every attention
module a ``lssa_temperature`` child holding log(tau) per query head, initialised to tau = 1 (the
paper). It is an ordinary module: optimisers see it, peft trains and saves it through
``modules_to_save=["lssa_temperature"]``, and ``save_pretrained`` writes it with the weights.

Loading: transformers builds attention modules without it and drops its weights, so
``lssa_hf.from_pretrained`` (and the lm-eval model type) put them back with ``load_temperatures``;
a checkpoint whose config asks for temperatures but whose modules lack them refuses to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ATTRIBUTE = "lssa_temperature"  # child module name on each attention module
PARAMETER = "log_temperature"
SUFFIX = f"{ATTRIBUTE}.{PARAMETER}"  # state-dict key suffix


class HeadTemperature(nn.Module):
    """tau_h = exp(log_tau_h) for each query head; the log keeps tau positive under any update."""

    def __init__(self, num_heads: int, device=None):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(num_heads, device=device, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def extra_repr(self) -> str:
        return f"num_heads={self.log_temperature.numel()}"


def attention_modules(model) -> list[nn.Module]:
    """The attention module of every layer, in order (class name ends in "Attention"; outermost only)."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in found if not any(o is not m and o in set(m.modules()) for o in found)]


def num_heads(module) -> int:
    """The number of query heads of an attention module."""
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not heads:
        raise NotImplementedError(f"Cannot tell how many query heads {type(module).__name__} has; per-head settings "
                                  "(temperatures, softmax_heads) need `num_heads` or `config.num_attention_heads`.")
    return int(heads)


def has_temperatures(model) -> bool:
    return any(hasattr(m, ATTRIBUTE) for m in attention_modules(model))


def add_temperatures(model) -> None:
    """Give each attention module that lacks one a temperature of 1 per head."""
    modules = attention_modules(model)
    if not modules:
        raise NotImplementedError(f"No attention modules found in {type(model).__name__} for per-head temperatures.")
    for module in modules:
        if not hasattr(module, ATTRIBUTE):
            device = next(module.parameters(), torch.empty(0)).device
            module.add_module(ATTRIBUTE, HeadTemperature(num_heads(module), device))


def remove_temperatures(model) -> list[tuple[nn.Module, HeadTemperature]]:
    """Take every attention module's temperature off; returns them for ``reattach``."""
    kept = [(module, getattr(module, ATTRIBUTE)) for module in attention_modules(model)
            if ATTRIBUTE in module._modules]
    for module, _ in kept:
        delattr(module, ATTRIBUTE)
    return kept


def reattach(kept: list[tuple[nn.Module, HeadTemperature]]) -> None:
    """Put back temperatures taken off by ``remove_temperatures`` (the same parameters)."""
    for module, temperature in kept:
        module.add_module(ATTRIBUTE, temperature)


def module_temperature(module, required: bool = False):
    """tau of one attention module (None: the paper's fixed scale); ``required``: the settings say the
    model has learned temperatures, so a module without one is a checkpoint loaded without them."""
    found = getattr(module, ATTRIBUTE, None)
    if found is None and required:
        raise RuntimeError("This model was saved with learned per-head LSSA temperatures, which transformers "
                           "does not load by itself: load it with lssa_hf.from_pretrained(path) (or call "
                           "lssa_hf.temperature.restore_temperatures(model, path) after patch).")
    return None if found is None else found()


def temperatures(model) -> torch.Tensor:
    """(layers, heads) tensor of tau, for inspection and reports."""
    return torch.stack([getattr(m, ATTRIBUTE)().detach().float().cpu() for m in attention_modules(model)
                        if hasattr(m, ATTRIBUTE)])


def _checkpoint_files(name_or_path: str, **kwargs) -> list[str]:
    """The safetensors files of a local folder or hub checkpoint (hub files come from the cache)."""
    folder = Path(name_or_path) / kwargs.get("subfolder", "")
    if folder.is_dir():
        return [str(f) for f in sorted(folder.glob("*.safetensors"))]
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs}
    index = cached_file(name_or_path, "model.safetensors.index.json",
                        _raise_exceptions_for_missing_entries=False, **hub)
    if index:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [cached_file(name_or_path, name, **hub) for name in names]
    return [cached_file(name_or_path, "model.safetensors", **hub)]


def restore_temperatures(model, name_or_path: str, **kwargs) -> None:
    """Put back the per-head temperatures of a checkpoint saved with them (transformers builds the
    attention modules without them and drops their weights); nothing to do for other checkpoints."""
    from .settings import LSSAConfig

    stored = LSSAConfig.of(getattr(model, "config", None))
    if stored is not None and stored.head_temperature and "gguf_file" not in kwargs:
        add_temperatures(model)
        load_temperatures(model, name_or_path, **kwargs)


def load_temperatures(model, name_or_path: str, **kwargs) -> None:
    """Copy the checkpoint's stored temperatures into ``model`` (patched with head_temperature=True)."""
    from safetensors import safe_open

    targets = {name: p for name, p in model.named_parameters() if name.endswith(SUFFIX)}
    stored = {}
    for file in _checkpoint_files(name_or_path, **kwargs):
        with safe_open(file, framework="pt") as f:
            stored.update({key: f.get_tensor(key) for key in f.keys() if key.endswith(SUFFIX)})
    missing = [name for name in targets if name not in stored]
    if missing:
        raise ValueError(f"{name_or_path} is configured with per-head temperatures but stores none for "
                         f"{len(missing)} attention modules (e.g. {missing[0]}): re-save it with lssa_hf.")
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(stored[name].to(param.dtype))

