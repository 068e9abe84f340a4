#!/usr/bin/env bash
# What closes the gap to softmax + LoRA (recipes/adapt/configs/ablation-cpu.yaml): every row adapted
# for 40 steps of 2 x 256 tokens (some rows for 120, 360, 720 or 1080, some on 1K-token blocks),
# evaluated at 256 and 1K; then rows at 4K and 16K (twice SmolLM2's 8K window). One thread per process: two jobs on a small
# machine otherwise fight over cores (OpenMP threads spin). Run from the repository root; models
# and cells are cached.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=recipes/adapt/configs/ablation-cpu.yaml
python recipes/adapt/run_table.py --config $CONFIG
python recipes/adapt/run_table.py --config $CONFIG --name table-long --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA" "LSSAR p=15 + LoRA" "LSSAR p=3 + LoRA + head temperature"
# nine times the budget, up to 16K
python recipes/adapt/run_table.py --config $CONFIG --name table-360-long --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA (360 steps)" "LSSAR p=3 + LoRA + head temperature (360 steps)"
# eighteen times the budget, up to 16K
python recipes/adapt/run_table.py --config $CONFIG --name table-720-long --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA (720 steps)" "LSSAR p=3 + LoRA + head temperature (720 steps)"
# the 720-step budget (369K tokens) in 1K-token blocks, up to 16K
python recipes/adapt/run_table.py --config $CONFIG --name table-1k-long --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA (1K blocks)" "LSSAR p=3 + LoRA + head temperature (1K blocks)"
# a sharper re-weighting: p=6 against p=3 at the 360-step budget, and on 1K-token blocks
python recipes/adapt/run_table.py --config $CONFIG --name table-p6-long --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA (360 steps)" "LSSAR p=3 + LoRA + head temperature (360 steps)" \
  "LSSAR p=6 + LoRA + head temperature (360 steps)" "softmax + LoRA (1K blocks)" \
  "LSSAR p=3 + LoRA + head temperature (1K blocks)" "LSSAR p=6 + LoRA + head temperature (1K blocks)"
# at the 720-step budget: p = 3, 4, 5, 6 and p scheduled from 3 to 6; then the pair with p = 6 continued for 360
# more steps (init_adapter: the 720-step runs, trained by the rows before them)
python recipes/adapt/run_table.py --config $CONFIG --name table-720-p --lengths 256 1024 4096 16384 \
  --rows "softmax (original)" "softmax + LoRA (720 steps)" "LSSAR p=3 + LoRA + head temperature (720 steps)" \
  "LSSAR p=4 + LoRA + head temperature (720 steps)" "LSSAR p=5 + LoRA + head temperature (720 steps)" \
  "LSSAR p=6 + LoRA + head temperature (720 steps)" \
  "LSSAR p=3 then 6 + LoRA + head temperature (720 steps)" "softmax + LoRA (720 + 360 steps)" \
  "LSSAR p=6 + LoRA + head temperature (720 + 360 steps)"
# where in a 16K window each model loses: loss by context size (tokens seen) on one WikiText-2 window;
# run folders are named by a hash of their row's settings (these are the 720-step pair)
RUNS=runs/adapt/ablation-cpu/runs
lssa-hf extrapolate smollm2="softmax (original)" $RUNS/softmax-1aab3b5e="softmax + LoRA (720 steps)" \
  $RUNS/lssar-p3-bf2afcb8="LSSAR (720 steps)" --text ../shared/data/wikitext-2-raw/wiki.test.raw \
  --train-length 256 --factors 1 64 --tokens 16384 --threads 1
