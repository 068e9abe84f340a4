"""lssa_hf: softplus attention with length scaling and re-weighting (LSSA / LSSAR, arXiv 2501.13428)
for Hugging Face transformers models.

    import lssa_hf
    model = lssa_hf.patch(model, variant="lssar", p=15.0)   # or lssa_hf.set_attention(model, "lssar")
    # or: AutoModelForCausalLM.from_pretrained(name, attn_implementation="lssar")

Importing lssa_hf (or its math: ``functional``, ``attention``, ``kernels``) does not import
transformers; the backends are registered with transformers as soon as it is imported.
"""

from .attention import lssa_attention
from .integrations import register_on_import as _register_on_import
from .settings import ATTENTIONS, BACKENDS, DEFAULT_P, VARIANTS, LSSAConfig

__version__ = "0.1.0"

_register_on_import()

_PATCHING = ("from_pretrained", "is_patched", "patch", "set_attention", "settings_of", "unpatch", "update_settings")


def __getattr__(name):  # the transformers glue loads on first use
    if name in _PATCHING:
        from . import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'lssa_hf' has no attribute {name!r}")


__all__ = [
    "ATTENTIONS",
    "BACKENDS",
    "DEFAULT_P",
    "LSSAConfig",
    "VARIANTS",
    *_PATCHING,
    "lssa_attention",
    "__version__",
]
