#!/usr/bin/env bash
# Issue #14's table: LSSAR against softmax + YaRN (with and without the same LoRA) at 512-32K
# (recipes/adapt/configs/table-baselines-cpu.yaml). Two processes of one thread each (OpenMP threads
# of two jobs otherwise fight over the cores), then the table from the cache. Every trained model
# and every cell is cached under the config's output_dir: an interrupted run resumes where it stopped.
# Many hours on 2 cores (a 32K-token LSSAR window is ~20 min on one thread). Run from the repo root.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=recipes/adapt/configs/table-baselines-cpu.yaml
python recipes/adapt/run_table.py --config $CONFIG --name part-a \
  --rows "LSSAR p=5 + YaRN x2 + LoRA" "LSSAR p=5 + LoRA" "softmax (original)" "softmax + YaRN x4 (no training)" &
A=$!
python recipes/adapt/run_table.py --config $CONFIG --name part-b \
  --rows "softmax + YaRN x2 (no training)" "softmax + YaRN x2 + LoRA" "ssmax + LoRA" "softmax + LoRA" &
B=$!
wait $A
wait $B
python recipes/adapt/run_table.py --config $CONFIG
