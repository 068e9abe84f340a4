"""Native CPU kernel for the LSSA forward strip (C++, AVX-512), built on first use.

``csrc/softplus_avx512.cpp`` overwrites a score strip with softplus and returns the row sums in one
pass, about 3x faster than the inductor-compiled pass plus a sum (``benchmarks/softplus_pass.py``):
LSSA's forward is two GEMMs and this pass. It is built with ``torch.utils.cpp_extension`` (a C++
compiler and ninja; cached under ``TORCH_EXTENSIONS_DIR``) and used by the ``blocked_compiled``
path for fp32 CPU strips on Linux CPUs with AVX-512. Anywhere else, or if the build fails (logged
once), the compiled ops run: the same maths. ``LSSA_NATIVE=0`` disables it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_ENV = "LSSA_NATIVE"  # "0" disables the native kernel
SOURCE = Path(__file__).parent / "csrc" / "softplus_avx512.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-fopenmp"]  # OpenMP: at::parallel_for runs in threads
_module = None
_unavailable = False  # unsupported here, or the build failed: decided once per process


def supported() -> bool:
    """Whether this machine can run the kernel (before building it)."""
    return (os.environ.get(NATIVE_ENV, "1") != "0" and sys.platform.startswith("linux")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def module():
    """The built extension, or None where unsupported or the build failed."""
    global _module, _unavailable
    if _module is not None or _unavailable:
        return _module
    if not supported():  # checked once: this runs per strip
        _unavailable = True
        return None
    try:
        from torch.utils.cpp_extension import load
        _ninja_on_path()
        _module = load("lssa_hf_softplus_avx512", [str(SOURCE)], extra_cflags=FLAGS,
                       extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler / ninja: the compiled path computes the same thing
        logger.warning("LSSA: native CPU kernel unavailable (%s); using the compiled strips.", err)
        _unavailable = True
    return _module


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) may sit in a virtual
    environment that is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """Whether the native kernel is built (building it now if needed) and usable."""
    return module() is not None


def lssa_forward(fallback):
    """``blocked`` op ``fwd_lssa`` (strip -> weights in place, row sums) that runs the native kernel
    on contiguous fp32 CPU strips and ``fallback`` on anything else."""
    def fwd_lssa(s):
        if s.dtype == torch.float32 and s.device.type == "cpu" and s.is_contiguous() and available():
            return s, _module.softplus_rowsum_(s)
        return fallback(s)

    return fwd_lssa
