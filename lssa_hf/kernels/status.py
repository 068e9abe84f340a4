"""Which kernels run on this machine, and why the others are off (``lssa-hf info``, and the
``LSSA_REQUIRE_KERNELS`` switch of the test suite, which turns a missing kernel into a failure)."""

from __future__ import annotations

import os
import shutil
import sys

import torch

from . import flex, native, triton_lssa

REQUIRE_ENV = "LSSA_REQUIRE_KERNELS"  # e.g. "native" or "native,triton": tests fail if one is off
KERNELS = ("native", "triton", "flex")


def why_off(name: str) -> str | None:
    """None if kernel ``name`` runs here (building the native strips now if needed), else the reason."""
    if name == "native":
        return _native()
    if name == "triton":
        return _triton()
    if name == "flex":
        return None if flex.available() else "torch.nn.attention.flex_attention is missing from this torch"
    raise ValueError(f"Unknown kernel {name!r}: one of {KERNELS}.")


def _native() -> str | None:
    if not native.enabled():
        return f"disabled by {native.NATIVE_ENV}=0"
    if not native.supported():
        return f"needs Linux on x86-64 or aarch64 (this is {sys.platform}/{os.uname().machine})"
    if shutil.which(os.environ.get("CXX", "c++")) is None and not native.build_dir(native.isa()).exists():
        return "needs a C++ compiler (c++ not on PATH) for its one-time build"
    if native.available():
        return None
    return f"the {native.isa()} build failed: {native.unavailable_reason()}"


def _triton() -> str | None:
    if not triton_lssa.available():
        return "the triton package is not installed: pip install lssa-hf[gpu]"
    if torch.cuda.is_available():
        return None
    if triton_lssa.interpreting():
        return None  # TRITON_INTERPRET=1: the kernels run on CPU tensors (slowly: for tests)
    return "no CUDA GPU (on CPU it runs only under TRITON_INTERPRET=1, for tests)"


def required() -> list[str]:
    names = [n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()]
    unknown = set(names) - set(KERNELS)
    if unknown:
        raise ValueError(f"{REQUIRE_ENV} names unknown kernels {sorted(unknown)}: use {', '.join(KERNELS)}.")
    return names
