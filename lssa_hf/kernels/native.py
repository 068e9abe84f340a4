"""Native CPU strips (C++, ``csrc/strips.cpp``): all four passes, built for this CPU on first use.

The kernels are written once against ATen's ``at::vec::Vectorized`` and compiled for one instruction
set: ``avx512``, ``avx2`` or ``default`` (NEON on aarch64, plain C++ elsewhere). The host's is the one
torch itself runs (``torch.backends.cpu.get_cpu_capability()``); ``LSSA_NATIVE_ISA=avx2`` (or
``default``) forces a narrower build, e.g. to test and benchmark the AVX2 kernels on an AVX-512
machine; a wider one than the CPU has is refused. Several ISAs' builds can be loaded in one process.

Build: ``torch.utils.cpp_extension`` (a C++ compiler and ninja, a dependency), about a minute once
per machine, logged. The build folder is keyed by source, flags, ISA, torch and Python versions, so a
fresh process imports the built library directly (milliseconds) and never recompiles. Where no
compiler exists or the build fails, the reason is logged once and the pure-torch strips (the same
maths) run. ``LSSA_NATIVE=0`` disables the native strips.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_ENV = "LSSA_NATIVE"  # "0" disables the native strips
ISA_ENV = "LSSA_NATIVE_ISA"  # "auto" (default), "avx512", "avx2", "default"
SOURCE = Path(__file__).parent / "csrc" / "strips.cpp"
ISAS = ("default", "avx2", "avx512")  # narrowest first
# as ATen compiles its own per-ISA kernels (cmake/Codegen.cmake): the macros pick at::vec's ISA
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]  # OpenMP: at::parallel_for runs in threads

# LSSA forward and backward, fused (flash style): query blocks of Q_BLOCK rows walk their keys in
# tiles of K_BLOCK whose scores stay in cache (K_BLOCK = 0: the strip path, as LSSAR's). Forward
# tasks are (query head, block), backward tasks (batch, KV head): with fewer of those than threads
# the backward keeps the strip path. Measured in docs/kernels.md.
Q_BLOCK = 128
K_BLOCK = 512

_modules: dict = {}
_unavailable: dict = {}  # isa -> reason
calls: collections.Counter = collections.Counter()  # strip passes run, by implementation ("avx2", "torch")


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1") != "0"


def host_isa() -> str:
    """The widest ISA this CPU (as torch sees it) runs."""
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")


def isa() -> str:
    """The ISA of the native build this process uses (``LSSA_NATIVE_ISA`` or the host's)."""
    want = os.environ.get(ISA_ENV, "auto").lower()
    host = host_isa()
    if want in ("", "auto"):
        return host
    if want not in ISAS:
        raise ValueError(f"{ISA_ENV}={want!r}: use one of auto, {', '.join(ISAS)}.")
    if ISAS.index(want) > ISAS.index(host):
        raise ValueError(f"{ISA_ENV}={want}: this CPU runs at most {host}; set {ISA_ENV}=auto or a narrower ISA.")
    return want


def supported() -> bool:
    """Whether the native strips may run here (before building them)."""
    return enabled() and sys.platform.startswith("linux") and (
        platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"))


def _build_name(which: str) -> str:
    flags = FLAGS + ISA_FLAGS[which]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, torch.__version__, sys.version,
                                    platform.machine()]).encode()).hexdigest()[:12]
    return f"lssa_hf_strips_{which}_{key}"


def build_dir(which: str) -> Path:
    # torch.utils.cpp_extension.get_default_build_root(), without importing that module (and setuptools)
    # on the path that only loads a built library
    import torch._appdirs
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(
        torch._appdirs.user_cache_dir(appname="torch_extensions"))
    return Path(root) / _build_name(which)


def module(which: str | None = None):
    """The built extension for ``which`` ISA (default ``isa()``), or None where it cannot run."""
    which = which or isa()
    if which in _modules or which in _unavailable:
        return _modules.get(which)
    if not supported():
        _unavailable[which] = "disabled" if not enabled() else f"unsupported platform {sys.platform}/{platform.machine()}"
        return None
    try:
        _modules[which] = _load(which)
    except Exception as err:  # no compiler / ninja: the pure-torch strips compute the same thing
        _unavailable[which] = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        logger.warning("LSSA: native CPU strips (%s) unavailable (%s); using the pure-torch strips.",
                       which, _unavailable[which])
    return _modules.get(which)


def _load(which: str):
    name = _build_name(which)
    folder = build_dir(which)
    built = folder / f"{name}.so"  # cpp_extension's LIB_EXT on Linux, the only platform built for
    if built.exists():  # built before on this machine: import it (no ninja, no compiler run)
        spec = importlib.util.spec_from_file_location(name, built)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    from torch.utils.cpp_extension import load
    _ninja_on_path()
    folder.mkdir(parents=True, exist_ok=True)
    logger.warning("LSSA: building the native CPU strips for %s once for this machine (about a minute) in %s",
                   which, folder)
    return load(name, [str(SOURCE)], extra_cflags=FLAGS + ISA_FLAGS[which], extra_ldflags=["-fopenmp"],
                build_directory=str(folder))


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) may sit in a virtual
    environment that is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available(which: str | None = None) -> bool:
    """Whether the native strips are built (building them now if needed) and usable."""
    return module(which) is not None


def unavailable_reason(which: str | None = None) -> str | None:
    return _unavailable.get(which or isa())


def runs(t: torch.Tensor) -> bool:
    """Whether the native strips take this compute tensor (CPU, float32 / float64)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
