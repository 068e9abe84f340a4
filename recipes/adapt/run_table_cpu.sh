#!/usr/bin/env bash
# The full SmolLM2-135M table (every row, 512-16K, adaptation at 512 tokens) at a CPU-sized
# budget: recipes/adapt/configs/table-smollm2-cpu.yaml. About 2 hours on 2 cores: two processes of one
# thread each (OpenMP threads of two jobs otherwise fight over the cores), then the table from the
# cache. Run from the repository root; models and cells are cached, so an interrupted run resumes.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=recipes/adapt/configs/table-smollm2-cpu.yaml
python recipes/adapt/run_table.py --config $CONFIG --name part-a \
  --rows "softmax (original)" "softmax + LoRA" "LSSA (no adaptation)" "LSSA + LoRA" &
A=$!
python recipes/adapt/run_table.py --config $CONFIG --name part-b --rows "LSSAR p=15 + LoRA" "LSSAR p=5 + LoRA" &
B=$!
wait $A
wait $B
python recipes/adapt/run_table.py --config $CONFIG
