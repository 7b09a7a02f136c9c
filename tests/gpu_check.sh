#!/usr/bin/env bash
# The GPU check in one command, from any folder: `bash tests/gpu_check.sh [--dry-run] [--out DIR] ...`
# (tests/gpu_check.py --help lists the options). On the lent device machine its python3 holds PyTorch; elsewhere
# the active virtual environment's python is used.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec "${PYTHON:-python3}" tests/gpu_check.py "$@"
