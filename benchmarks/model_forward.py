"""Model-level benchmark: SmolLM2-135M forward (no grad) at long lengths, sdpa vs LSSA vs LSSAR.

Each (attention, length) runs in a fresh process: one warm-up forward at 1024 tokens (loads the
native build and warms the allocator), then one timed forward. Peak extra
memory is the process RSS sampled every 5 ms during that forward minus the RSS just before it.

    python benchmarks/model_forward.py --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def measure(attention: str, length: int) -> dict:
    """Runs inside the child process."""
    import psutil
    import torch

    import lssa_hf
    from lssa_hf.models import load

    model, _ = load("smollm2")
    if attention != "sdpa":
        lssa_hf.patch(model, variant=attention)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :1024])
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"attention": attention, "length": length, "seconds": seconds,
            "peak_extra_mib": (peak[0] - base) / 2**20, "loss": loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--attentions", nargs="+", default=["sdpa", "lssa", "lssar"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return 0
    rows = []
    for length in args.lengths:
        for attention in args.attentions:
            out = subprocess.run([sys.executable, __file__, "--child", attention, str(length)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| length | attention | forward s | x sdpa | peak extra MiB | x sdpa |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        ref = next(r for r in rows if r["length"] == row["length"] and r["attention"] == "sdpa")
        print(f"| {row['length']} | {row['attention']} | {row['seconds']:.1f} | {row['seconds'] / ref['seconds']:.2f} "
              f"| {row['peak_extra_mib']:.0f} | {row['peak_extra_mib'] / max(ref['peak_extra_mib'], 1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
