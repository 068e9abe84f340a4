"""Exact LSSA / LSSAR kernels: ``blocked`` (query strips, any device, memory linear in L), ``native``
(the same strips in C++ for CPUs, all four passes), ``ops`` (both behind torch.library custom ops),
``flex`` (torch flex_attention). ``lssa_hf.attention`` dispatches between them."""

from . import ops  # noqa: F401  (registers torch.ops.lssa_hf)
