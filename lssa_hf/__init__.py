"""lssa_hf: softplus attention with length scaling and re-weighting (LSSA / LSSAR, arXiv 2501.13428)
for Hugging Face transformers models.

    import lssa_hf
    model = lssa_hf.patch(model, variant="lssar", p=15.0)
    # or: AutoModelForCausalLM.from_pretrained(name, attn_implementation="lssar")
"""

from .attention import lssa_attention
from .functional import VARIANTS
from .integrations.hf_attention import register as _register
from .patching import from_pretrained, is_patched, patch, settings_of, unpatch
from .settings import LSSAConfig

__version__ = "0.1.0"

_register()

__all__ = [
    "LSSAConfig",
    "VARIANTS",
    "from_pretrained",
    "is_patched",
    "lssa_attention",
    "patch",
    "settings_of",
    "unpatch",
    "__version__",
]
