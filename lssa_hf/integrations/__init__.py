"""Glue to transformers, kept out of the math: ``hf_attention`` registers the "lssa"/"lssar"
backends. ``register_on_import`` (run by ``import lssa_hf``) registers them at once when transformers
is already imported, else as soon as it is, so importing the math never imports transformers."""

from __future__ import annotations

import importlib.abc
import sys

_TARGET = "transformers"


def register_on_import() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register() -> None:
    partial = sys.modules.get(__name__ + ".hf_attention")
    if partial is not None and not hasattr(partial, "register"):
        return  # transformers was first imported by hf_attention itself, which registers once loaded
    from .hf_attention import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is imported it lets the other finders locate it and
    wraps that module's loader so the backends are registered right after transformers has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once: and the lookup below must not find this finder again
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader, load = spec.loader, spec.loader.exec_module

                def exec_module(module):
                    del loader.exec_module  # once, even if the loader instance serves other modules
                    load(module)
                    _register()

                loader.exec_module = exec_module  # an instance attribute: only this loader
                return spec
        return None
