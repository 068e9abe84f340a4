"""Mutation checks: each mutation below breaks one kernel's maths; the tests named beside it must fail.

    python tests/mutations.py            # every mutation, in a temporary git worktree of HEAD
    python tests/mutations.py --list

Each mutation is applied to a fresh checkout (the first occurrence of the text), the tests run, and
the mutation counts as caught when pytest fails. The native strips rebuild per C++ mutation (a
minute each). Not collected by pytest (no test_ prefix); the last results are in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON = "tests/test_triton.py -k interpreter"
MUTATIONS = [  # (name, file, text, replacement, tests that must fail)
    ("materialized: N > 3 -> N > 2", "lssa_hf/functional.py", "m = torch.where(n > 3, total",
     "m = torch.where(n > 2, total", "tests/test_functional.py tests/test_kernels.py"),
    ("torch + native strips: N > 3 -> N > 2", "lssa_hf/kernels/blocked.py",
     "torch.where(n > 3, 1.0 / n.clamp_min(1).to(dtype)", "torch.where(n > 2, 1.0 / n.clamp_min(1).to(dtype)",
     "tests/test_kernels.py tests/test_native.py"),
    ("triton: N > 3 -> N > 2", "lssa_hf/kernels/triton_lssa.py", "alpha = torch.where(n > 3,",
     "alpha = torch.where(n > 2,", TRITON),
    ("every kernel: log N -> log(N + 1) (shared prologue)", "lssa_hf/functional.py",
     "torch.log(visible.clamp_min(1))", "torch.log(visible.clamp_min(1) + 1)",
     "tests/test_kernels.py tests/test_native.py"),
    ("triton: its own N = hi - lo -> hi - lo + 1", "lssa_hf/kernels/triton_lssa.py",
     "n = (hi - lo).clamp_min(0)", "n = (hi - lo + 1).clamp_min(0)", TRITON),
    ("native: GQA heads interleaved", "lssa_hf/kernels/csrc/strips.cpp",
     "const auto qs5 = qs.view({b, hkv, g, lq, d});", "const auto qs5 = qs.view({b, g, hkv, lq, d}).transpose(1, 2);",
     "tests/test_native.py"),
    ("native LSSA fused forward: GQA heads interleaved", "lssa_hf/kernels/csrc/strips.cpp",
     "rn = std::min(qb, bq - r0), bh = bhg / st.g;", "rn = std::min(qb, bq - r0), bh = bhg % (st.b * st.hkv);",
     "tests/test_native.py"),
    ("triton: GQA heads interleaved", "lssa_hf/kernels/_triton_kernels.py",
     "    kb = K + b * skb + (h // G) * skh\n    vb = V + b * svb + (h // G) * svh\n    mask_ptr",
     "    kb = K + b * skb + (h % (HQ // G)) * skh\n    vb = V + b * svb + (h % (HQ // G)) * svh\n    mask_ptr",
     TRITON),
    ("materialized: no tie rule", "lssa_hf/functional.py", "has_mass = max_x > tie_tolerance(n, sp.dtype) * m",
     "has_mass = max_x > 0 * m", "tests/test_ties.py"),
    ("native: no tie rule", "lssa_hf/kernels/csrc/strips.cpp", "!(mx > m * tie)", "!(mx > m)", "tests/test_ties.py"),
    ("triton: no tie rule", "lssa_hf/kernels/_triton_kernels.py", "fallback = top <= m * tie",
     "fallback = top <= m", "tests/test_ties.py"),
    ("native: no half-precision gradient bound", "lssa_hf/kernels/csrc/strips.cpp", "if (floor_u > T(0)) {",
     "if (false) {", "tests/test_ties.py"),
    ("native LSSA key tiles: S overwritten per tile", "lssa_hf/kernels/csrc/strips.cpp",
     "total[i] += fwd_lssa_row(x, vis);", "total[i] = fwd_lssa_row(x, vis);", "tests/test_native.py -k fused_key_tiles"),
    ("native LSSA fused backward: dk overwritten per query block", "lssa_hf/kernels/csrc/strips.cpp",
     "qc.data(), d, T(1), dk + k0 * d, d);", "qc.data(), d, T(0), dk + k0 * d, d);",
     "tests/test_native.py -k fused_key_tiles"),
]


def run(mutation, repo: Path) -> tuple[bool, str]:
    name, path, text, replacement, tests = mutation
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    source = (repo / path).read_text()
    if text not in source:
        raise SystemExit(f"mutation {name!r}: text not found in {path} (update tests/mutations.py)")
    (repo / path).write_text(source.replace(text, replacement, 1))
    done = subprocess.run(f"{sys.executable} -m pytest -q -x -p no:cacheprovider {tests}", shell=True, cwd=repo,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode != 0, lines[-1] if lines else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m[0]}: {m[1]} ({m[4]})")
        return 0
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(repo), "HEAD"], cwd=ROOT, check=True)
        try:
            for m in MUTATIONS:
                caught, summary = run(m, repo)
                missed += not caught
                print(f"{'caught' if caught else 'MISSED'}: {m[0]} ({summary})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(repo)], cwd=ROOT, check=False)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
