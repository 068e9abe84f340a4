#!/usr/bin/env bash
# The full SmolLM2-135M adaptation table (8 rows, 512-16K tokens). Run from the repository root.
# GPU: minutes per row. CPU: hours; 8K/16K need the memory-efficient LSSA kernel (see docs/finetune.md).
set -euo pipefail
python recipes/adapt/run_table.py --config recipes/adapt/configs/table-smollm2.yaml "$@"
