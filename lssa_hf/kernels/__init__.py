"""Exact LSSA / LSSAR kernels: ``blocked`` (any device, memory linear in L), ``compiled`` (its fused
per-strip maths), ``native`` (a C++ CPU pass for the LSSA forward strip), ``flex`` (torch
flex_attention). ``lssa_hf.attention`` dispatches between them."""
