#!/usr/bin/env bash
# The full SmolLM2-135M table (every row, 512-16K, adaptation at 512 tokens) at a CPU-sized
# budget: recipes/adapt/configs/table-smollm2-cpu.yaml. About 2 hours on 2 cores (two rows at a time,
# one thread each, plus the two zero-training YaRN rows). Run from the repository root.
exec bash recipes/adapt/run_table_parts.sh recipes/adapt/configs/table-smollm2-cpu.yaml \
  "softmax (original)" "softmax + LoRA" "LSSA (no adaptation)" "LSSA + LoRA" "softmax + YaRN x2 (no training)" -- \
  "LSSAR p=15 + LoRA" "LSSAR p=5 + LoRA" "softmax + YaRN x4 (no training)"
