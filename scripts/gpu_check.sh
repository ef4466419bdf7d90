#!/usr/bin/env bash
# Prove the GPU backends on this machine's GPU: build, GPU tests, compute-sanitizer, benchmarks, a
# pass/fail table (see cusprun/gpu_check.py). Without a GPU: the checks that need none, exit 0.
#   [PYTHON=/path/to/python] bash scripts/gpu_check.sh [--skip STEP ...] [--only STEP ...]
# Python: $PYTHON, else the repository's .venv, else python3 (on the GPU image, the one holding torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python)
fi
exec "$PY" -m cusprun.gpu_check "$@"
