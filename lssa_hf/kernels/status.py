"""Which kernels run on this machine, and why the others are off (``lssa-hf info``, and the
``LSSA_REQUIRE_KERNELS`` switch of the test suite, which turns a missing kernel into a failure)."""

from __future__ import annotations

import os
import shutil
import sys

import torch

from . import compiled, flex, native

REQUIRE_ENV = "LSSA_REQUIRE_KERNELS"  # e.g. "compiled" or "native,compiled": tests fail if one is off
KERNELS = ("native", "compiled", "flex")


def why_off(name: str) -> str | None:
    """None if kernel ``name`` runs here (building or compiling it now if needed), else the reason."""
    if name == "native":
        return _native()
    if name == "compiled":
        return _compiled()
    if name == "flex":
        return None if flex.available() else "torch.nn.attention.flex_attention is missing from this torch"
    raise ValueError(f"Unknown kernel {name!r}: one of {KERNELS}.")


def _native() -> str | None:
    if os.environ.get(native.NATIVE_ENV, "1") == "0":
        return f"disabled by {native.NATIVE_ENV}=0"
    if not compiled.enabled():
        return f"disabled by {compiled.COMPILE_ENV}=0 (it runs inside blocked_compiled)"
    if not sys.platform.startswith("linux"):
        return f"needs Linux (this is {sys.platform})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"needs an AVX-512 CPU (torch reports {capability})"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "needs a C++ compiler (c++/g++ not on PATH)"
    return None if native.available() else "the build failed (its warning in the log says why)"


def _compiled() -> str | None:
    if not compiled.enabled():
        return f"disabled by {compiled.COMPILE_ENV}=0"
    s = torch.zeros(2, 3)
    compiled.compiled_ops()["fwd_lssar"](s, torch.full((2, 1), 1 / 3), torch.ones(2, 1), 2.0)
    return None if compiled.working() else "torch.compile (inductor) failed here (its warning in the log says why)"


def required() -> list[str]:
    names = [n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()]
    unknown = set(names) - set(KERNELS)
    if unknown:
        raise ValueError(f"{REQUIRE_ENV} names unknown kernels {sorted(unknown)}: use {', '.join(KERNELS)}.")
    return names
