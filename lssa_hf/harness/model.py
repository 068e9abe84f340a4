"""The ``lssa-hf`` model type: the harness's HFLM with LSSA/LSSAR attention and no silent truncation.

    lm_eval --model lssa-hf --model_args pretrained=smollm2,variant=lssar,p=15 ...   (via ``lssa-hf eval``)

Model args beyond HFLM's own:
  variant       "lssa" | "lssar" | "ssmax" | "softmax" (the checkpoint's own attention, the baseline).
                Default: the settings stored in an LSSA checkpoint, else "lssar".
  rope          RoPE scaling set after loading, e.g. rope=yarn:2 (``lssa_hf.rope``: yarn, dynamic, linear,
                longrope, llama3; "default" removes scaling). Default: the checkpoint's own.
  p             LSSAR re-weighting power (default 15, or the checkpoint's).
  lssa_backend  LSSA kernel path ("auto", ...). ``backend=<that>`` is accepted too; HFLM's own
                backend values ("default", "causal", "seq2seq") keep their harness meaning.
  max_length    "auto" (default): grows to the longest request, so nothing is ever cut; an int is a
                hard limit and a longer request raises instead of being left-truncated.
  truncation    True restores the harness's behaviour of cutting long inputs from the left.
``pretrained`` may be a hub id, a folder, a ``.gguf`` file or "smollm2" (the offline SmolLM2-135M GGUF).
"""

from __future__ import annotations

import logging

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..models import resolve
from ..patching import is_patched, set_attention, settings_of
from ..rope import apply_rope, rope_of
from ..settings import SOFTMAX, LSSAConfig
from ..temperature import restore_temperatures

logger = logging.getLogger(__name__)

HFLM_BACKENDS = ("default", "causal", "seq2seq")


class TruncationError(ValueError):
    """A request is longer than ``max_length``; the stock harness would silently drop its start."""


@register_model("lssa-hf", "lssa_hf")
class LSSAHFLM(HFLM):
    def __init__(self, pretrained, variant: str | None = None, p: float | None = None,
                 lssa_backend: str | None = None, backend: str = "default", max_length=None,
                 truncation: bool = False, gguf_file: str | None = None, rope=None, **kwargs):
        if backend not in HFLM_BACKENDS:  # our kernel path, not HFLM's causal/seq2seq switch
            lssa_backend, backend = backend, "default"
        if isinstance(pretrained, str) and gguf_file is None:
            pretrained, extra = resolve(pretrained)
            gguf_file = extra.get("gguf_file")
        self._auto_length = max_length in (None, "", "auto")
        super().__init__(pretrained, backend=backend, truncation=truncation, gguf_file=gguf_file,
                         max_length=None if self._auto_length else int(max_length), **kwargs)
        if isinstance(pretrained, str) and gguf_file is None:  # HFLM's loader dropped learned temperatures
            revision = kwargs.get("revision")
            restore_temperatures(self._model, pretrained, **({"revision": revision} if revision else {}))
        apply_rope(self._model, rope)
        self._set_attention(variant, p, lssa_backend)

    def _set_attention(self, variant, p, backend) -> None:
        model = self._model
        stored = settings_of(model) or LSSAConfig()
        if variant == SOFTMAX:
            if p is not None or backend is not None:
                raise ValueError("p and lssa_backend only apply to variant=lssa|lssar, not softmax.")
            set_attention(model, SOFTMAX)
            return
        if variant is None and is_patched(model) and p is None and backend is None:
            return  # an LSSA checkpoint or an already patched model: keep its settings
        set_attention(model, variant or stored.variant, p=stored.p if p is None else float(p),
                      backend=backend or stored.backend)

    @property
    def attention(self) -> str:
        settings = settings_of(self._model)
        return SOFTMAX if settings is None else settings.variant

    def get_model_info(self) -> dict:
        settings = settings_of(self._model)
        info = {"attention": self.attention, "max_length": self.max_length, "rope": rope_of(self._model)}
        if settings is not None:
            info |= {"lssa_p": settings.p, "lssa_backend": settings.backend}
        return super().get_model_info() | info

    # -- no silent truncation ------------------------------------------------------------------------
    def _fit(self, needed: int, what: str, loss: str = "drop the first {cut} tokens of its context") -> None:
        """Make room for ``needed`` tokens (auto mode) or refuse a request that would be cut."""
        if self._auto_length:
            if needed > (self._max_length or 0):
                logger.info("max_length=auto: %s requests of up to %d tokens (the model was trained to %s).",
                            what, needed, getattr(self.config, "max_position_embeddings", "?"))
                self._max_length = needed
        elif needed > self.max_length and not self.truncation:
            raise TruncationError(
                f"A {what} request needs {needed} tokens but max_length={self.max_length}: the harness would "
                f"{loss.format(cut=needed - self.max_length, limit=self.max_length)}. Pass max_length>={needed} (or "
                "max_length=auto) in --model_args, or truncation=True to accept the harness's cut.")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # HFLM feeds (context + continuation)[:-1], cut to its last max_length tokens.
        if requests:
            self._fit(max(len(ctx) + len(cont) - 1 for _, ctx, cont in requests), "loglikelihood")
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # HFLM splits a document into max_length windows: a long document would lose its context.
        if requests:
            self._fit(max(len(self.tok_encode(req.args[0])) for req in requests), "loglikelihood_rolling",
                      "score it in windows of {limit} tokens, each blind to what came before")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        # HFLM keeps the last (max_length - max_gen_toks) context tokens.
        if requests:
            needed = 0
            for req in requests:
                context, gen_kwargs = req.args
                gen_toks = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                needed = max(needed, self.tok_batch_encode([context])[0].shape[1] + gen_toks)
            self._fit(needed, "generate_until")
        return super().generate_until(requests, disable_tqdm=disable_tqdm)
