#!/usr/bin/env bash
# Issue #14's table: LSSAR against softmax + YaRN (with and without the same LoRA), ssmax and hybrids
# at 512-32K plus passkey (recipes/adapt/configs/table-baselines-cpu.yaml). Many hours on 2 cores;
# cached, so a rerun resumes. Run from the repo root.
exec bash recipes/adapt/run_table_parts.sh recipes/adapt/configs/table-baselines-cpu.yaml \
  "LSSAR p=5 + YaRN x2 + LoRA" "LSSAR p=5 + LoRA" "softmax (original)" "softmax + YaRN x4 (no training)" \
  "LSSAR p=5 + YaRN x4 + LoRA" "LSSAR p=5 + YaRN x2 + LoRA + softmax layers 0-3" \
  "LSSAR p=8 + YaRN x4 + LoRA + softmax layers 13,20,23,24 + YaRN-teacher warm start" \
  "LSSAR p=8 + YaRN x4 + LoRA + softmax layers 0-7 + YaRN-teacher warm start" \
  "LSSAR p=8 + YaRN x4 + LoRA + 72 probe-ranked softmax heads + YaRN-teacher warm start" -- \
  "softmax + YaRN x2 (no training)" "softmax + YaRN x2 + LoRA" "softmax + YaRN x4 + LoRA" "ssmax + LoRA" "softmax + LoRA" \
  "LSSAR p=6 + YaRN x2 + LoRA (1K blocks)" "LSSAR p=5 + YaRN x2 + LoRA calibrated tau" \
  "ssmax + YaRN x4 + LoRA" "LSSAR p=5 + YaRN x4 + LoRA + softmax layers 0-3" \
  "LSSAR p=5 + YaRN x4 + LoRA + softmax layers 0-3 + YaRN-teacher warm start" \
  "LSSAR p=5 + LoRA, YaRN x4 at evaluation" "softmax + LoRA, YaRN x4 at evaluation" \
  "softmax + YaRN x4 + LoRA (1M tokens)" "LSSAR p=5 + YaRN x4 + LoRA + softmax layers 0-3 (1M tokens)" \
  "LSSAR p=8 + YaRN x4 + LoRA + softmax layers 0-3 + YaRN-teacher warm start" \
  "LSSAR p=15 + YaRN x4 + LoRA + softmax layers 0-3 + YaRN-teacher warm start" \
  "LSSAR p=8 + YaRN x4 + LoRA + softmax layers 12,13,16,17,20,23,24,29 + YaRN-teacher warm start" \
  "LSSAR p=8 + YaRN x4 + LoRA + 16 probe-ranked softmax layers + YaRN-teacher warm start"
