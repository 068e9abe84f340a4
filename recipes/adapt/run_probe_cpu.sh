#!/usr/bin/env bash
# REDUCED probe of the table (~30 min on 2 shared CPU cores): 256-token adaptation, 60 steps,
# softmax-LoRA vs LSSAR-LoRA, evaluated at 256/512/1K. Run from the repository root.
set -euo pipefail
nice -n 10 python recipes/adapt/run_table.py --config recipes/adapt/configs/table-probe-cpu.yaml "$@"
