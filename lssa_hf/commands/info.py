"""``lssa-hf info``: versions, registered backends and the architectures LSSA can patch."""

from __future__ import annotations

import importlib
import importlib.metadata as md


def supported_model_types() -> tuple[list[str], list[str]]:
    """(supported, unsupported) causal-LM model types of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    supported, unsupported = [], []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = importlib.import_module(f"transformers.models.{model_type.replace('-', '_')}")
            cls = getattr(module, class_name)
        except Exception:  # optional dependencies missing, renamed modules: not loadable here
            continue
        ok = cls._supports_attention_backend and cls._can_set_attn_implementation()
        (supported if ok else unsupported).append(model_type)
    return sorted(supported), sorted(unsupported)


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def torch_cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run(args) -> int:
    import lssa_hf
    from transformers import AttentionInterface

    for name in ("lssa-hf", "torch", "transformers", "peft", "accelerate", "datasets", "lm-eval"):
        print(f"{name:>13}: {version(name)}")
    registered = [name for name in lssa_hf.VARIANTS if name in AttentionInterface._global_mapping]
    print(f"{'backends':>13}: {', '.join(registered)} (attn_implementation=...)")
    from lssa_hf.settings import BACKENDS
    print(f"{'kernel paths':>13}: {', '.join(BACKENDS)} (force with LSSA_BACKEND=...)")
    from lssa_hf.kernels import native, status
    print(f"{'CPU':>13}: {torch_cpu_capability()}")
    for name in status.KERNELS:  # builds the native strips once to find out
        reason = status.why_off(name)
        state = "runs here" + (f" ({native.isa()}, all four passes)" if name == "native" else "")
        print(f"{name + ' kernel':>13}: {state if reason is None else 'off: ' + reason}")
    if args.models:
        supported, unsupported = supported_model_types()
        print(f"\nsupported causal LM model types ({len(supported)}):\n  " + ", ".join(supported))
        print(f"\nnot supported, attention outside the interface ({len(unsupported)}):\n  " + ", ".join(unsupported))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions, backends and supported architectures")
    parser.add_argument("--no-models", dest="models", action="store_false",
                        help="skip the scan of model types (imports every transformers model module)")
    parser.set_defaults(func=run)
