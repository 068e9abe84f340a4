#!/usr/bin/env bash
# Length extrapolation on 2 CPU cores, one command:
#   bash recipes/extrapolation/run_cpu_small.sh [PRESET]        (default cpu-small; or cpu-small-bpe)
# Trains softmax / LSSA / LSSAR (p=15) Llama-style RoPE models at T=128 on the same data, seed and
# schedule, then measures held-out loss at 128..2048 tokens (1T..16T), including the LSSA model
# re-weighted at inference only (LSSAR p=1, 3, 15). Table: runs/extrapolation/PRESET/extrapolation.md,
# plot: docs/extrapolation_PRESET.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${1:-cpu-small}
PYTHON=${PYTHON:-.venv/bin/python}
RUN=runs/extrapolation/$PRESET
SECONDS=0
nice -n 10 "$PYTHON" recipes/extrapolation/pretrain.py --preset "$PRESET"
echo "training: ${SECONDS}s"
nice -n 10 "$PYTHON" -m lssa_hf.cli extrapolate \
    "$RUN/softmax=softmax" "$RUN/lssa=LSSA" "$RUN/lssar=LSSAR p=15" \
    "$RUN/lssa@lssar:1=LSSA, LSSAR p=1 at inference" \
    "$RUN/lssa@lssar:3=LSSA, LSSAR p=3 at inference" \
    "$RUN/lssa@lssar:15=LSSA, LSSAR p=15 at inference" \
    --text ../shared/data/wikitext-2/test.txt --tokens 32768 --threads 1 \
    --title "$PRESET: RoPE decoder trained at T=128, loss on WikiText-2 test" \
    --plot "docs/extrapolation_${PRESET//-/_}.png" --json "$RUN/extrapolation.json" | tee "$RUN/extrapolation.md"
echo "total: ${SECONDS}s"
