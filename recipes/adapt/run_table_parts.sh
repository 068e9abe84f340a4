#!/usr/bin/env bash
# Build an adaptation table in two processes of one thread each (OpenMP threads of two jobs
# otherwise fight over the cores), then print the whole table from the cache:
#   bash recipes/adapt/run_table_parts.sh CONFIG ROW_A1 ROW_A2 ... -- ROW_B1 ROW_B2 ...
# Rows run in the order given; every trained model and cell is cached, so a rerun resumes.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=$1; shift
A=(); while [[ $# -gt 0 && $1 != "--" ]]; do A+=("$1"); shift; done; shift || true
python recipes/adapt/run_table.py --config "$CONFIG" --name part-a --rows "${A[@]}" &
PA=$!
python recipes/adapt/run_table.py --config "$CONFIG" --name part-b --rows "$@" &
PB=$!
wait $PA
wait $PB
python recipes/adapt/run_table.py --config "$CONFIG"
