#!/usr/bin/env bash
# The one command for a GPU machine (issue 17); see benchmarks/gpu_check.py for the steps.
#   bash benchmarks/gpu_check.sh --out "$OUT"          # prepared beforehand: benchmarks/gpu_check_prepare.py
# Runs from any folder; uses $PYTHON, else python3 (the interpreter that holds torch there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
