#!/usr/bin/env bash
# Softmax vs LSSA vs LSSAR on SmolLM2-135M (offline GGUF): passkey accuracy and perplexity by context
# length, then the table + plot ($OUT/lssa_report.{md,png}). One harness run per (length, attention),
# so finished lengths are saved even if a longer one runs out of time or memory.
# CPU-sized defaults; on a GPU e.g.: LENGTHS="1 2 4 8 16" SAMPLES=10 WINDOWS=5 DEVICE=cuda bash $0
set -euo pipefail
LENGTHS=${LENGTHS:-"1 2 4 8 16"}     # thousands of tokens (tasks passkey_<k>k, ppl_<k>k)
SAMPLES=${SAMPLES:-4}                # passkey documents per length (needle depths 0, .5, .25, .75, ...)
WINDOWS=${WINDOWS:-1}                # perplexity windows per length
TEXT=${TEXT-../shared/data/books/pg2701_moby_dick.txt}  # Moby Dick if present; a file, folder or dataset name
[ -z "$TEXT" ] || [ -e "$TEXT" ] || TEXT=""   # "" = the built-in text (Python's documentation)
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/lm_eval_smollm2}
VARIANTS=${VARIANTS:-"softmax lssa lssar"}
for k in $LENGTHS; do
  for variant in $VARIANTS; do
    lssa-hf eval --no-report --model lssa-hf --model_args "pretrained=smollm2,variant=$variant" \
      --tasks "passkey_${k}k,ppl_${k}k" \
      --metadata "{\"num_samples\": $SAMPLES, \"num_windows\": $WINDOWS, \"text\": \"$TEXT\"}" \
      --device "$DEVICE" --batch_size 1 --output_path "$OUT"
  done
done
lssa-hf eval report "$OUT"
