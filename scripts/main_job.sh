#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on the embedded default model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
"$PY" -m cusprun.pipeline "$@"
